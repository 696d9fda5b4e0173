"""``vidrank models ...`` against a real registry: verification before any alias changes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from model.cli import app
from model.core.registry import Registry
from tests.service.service_helpers import corrupt_copy, publish_as


def run(registry: Path, *args: str) -> tuple[int, str]:
    done = CliRunner().invoke(app, ["models", *args, "--registry", str(registry)])
    return done.exit_code, done.output


@pytest.mark.parametrize("how", ["checksum_mismatch", "missing_onnx", "manifest_not_json"])
def test_rollback_to_a_corrupted_version_fails_and_changes_nothing(
    registry_copy: Path, version: str, how: str
) -> None:
    reg = Registry(registry_copy)
    publish_as(registry_copy, version, "broken")
    reg.activate("broken")
    reg.activate(version)  # the rollback stack now ends with "broken" ...
    corrupt_copy(registry_copy, version, "scratch", how)  # ... which then rots on disk
    target = registry_copy / "versions" / "broken"
    for name in ("model.onnx", "manifest.json"):
        (target / name).unlink()
        scratch = registry_copy / "versions" / "scratch" / name
        if scratch.exists():
            scratch.rename(target / name)
    before = reg.aliases_path.read_bytes()
    code, output = run(registry_copy, "rollback")
    assert code == 1, output
    assert "error: cannot roll back to broken" in output
    assert reg.aliases_path.read_bytes() == before


def test_rollback_to_a_valid_version(registry_copy: Path, version: str) -> None:
    publish_as(registry_copy, version, "v2")
    Registry(registry_copy).activate("v2")
    code, output = run(registry_copy, "rollback")
    assert code == 0, output
    assert json.loads(output)["production"] == version


def test_deactivate_needs_confirmation(registry_copy: Path, version: str) -> None:
    code, output = run(registry_copy, "deactivate")
    assert code == 1 and "--yes" in output
    assert Registry(registry_copy).read_aliases().production == version
    code, output = run(registry_copy, "deactivate", "--yes")
    assert code == 0, output
    assert json.loads(output)["production"] is None
    code, output = run(registry_copy, "rollback")
    assert code == 0 and json.loads(output)["production"] == version


def test_unwritable_registry_is_a_clean_error(registry_copy: Path, version: str) -> None:
    publish_as(registry_copy, version, "v2")
    (registry_copy / ".lock").unlink(missing_ok=True)
    (registry_copy / ".lock").mkdir()
    code, output = run(registry_copy, "activate", "v2")
    assert code == 1 and "registry is not writable" in output, output
    assert "Traceback" not in output
