"""``vidrank models`` commands that change the aliases: shadow, canary policy, history."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from model.cli import app
from model.core.policy import CanaryPolicy
from model.core.registry import Registry
from tests.model.core.test_registry import make_src


@pytest.fixture
def registry(tmp_path: Path) -> Path:
    reg = Registry(tmp_path / "registry")
    src = make_src(tmp_path / "src", "base")
    for name in ("v1", "v2", "v3"):
        reg.publish(src, name)
    return reg.root


def run(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def fail(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 1, result.output
    return result.output


def test_shadow_canary_policy_and_history(registry: Path) -> None:
    r = str(registry)
    run("models", "activate", "v1", "--registry", r, "--reason", "first")
    out = json.loads(run("models", "shadow", "v2", "--percent", "25", "--registry", r))
    assert out["shadow"] == {"version": "v2", "percent": 25.0}
    args = ["models", "canary", "v3", "--percent", "5", "--max-psi", "0.2", "--min-requests", "50"]
    out = json.loads(run(*args, "--registry", r, "--reason", "new like head"))
    assert out["canary"] == {
        "version": "v3", "percent": 5.0, "policy": {"max_psi": 0.2, "min_requests": 50}
    }  # fmt: skip
    assert Registry(registry).read_aliases().canary.policy == CanaryPolicy(  # type: ignore[union-attr]
        max_psi=0.2, min_requests=50
    )
    run("models", "canary", "--clear", "--registry", r)
    run("models", "shadow", "--clear", "--registry", r, "--reason", "enough")
    assert "max_psi" in fail("models", "canary", "v3", "--max-psi", "-1", "--registry", r)
    assert "percent" in fail("models", "shadow", "v2", "--percent", "0", "--registry", r)
    assert "already production" in fail("models", "shadow", "v1", "--registry", r)
    assert "VERSION or --clear" in fail("models", "shadow", "--registry", r)
    lines = run("models", "history", "--registry", r).splitlines()
    assert [line.split()[1:3] for line in lines] == [
        ["activate", "cli"], ["shadow_set", "cli"], ["canary_set", "cli"],
        ["canary_clear", "cli"], ["shadow_clear", "cli"],
    ]  # fmt: skip
    assert lines[0].endswith("- -> v1  first")
    assert "- -> v2 (25%)" in lines[1]
    assert lines[2].endswith("- -> v3 (5%)  new like head")
    assert lines[4].endswith("v2 -> -  enough")
    last_two = run("models", "history", "--registry", r, "--limit", "2", "--json").splitlines()
    assert [json.loads(x)["action"] for x in last_two] == ["canary_clear", "shadow_clear"]
    run("models", "shadow", "v3", "--registry", r)
    listing = [line.split() for line in run("models", "list", "--registry", r).splitlines()]
    assert ["v1", "production"] in listing and ["v3", "shadow"] in listing


@pytest.mark.parametrize(("impressions", "split"), [("10", "train"), ("300", "valid")])
def test_train_on_too_little_data_is_one_line_before_any_training(
    tmp_path: Path, impressions: str, split: str
) -> None:
    """Too few impressions, or a split without both outcomes of a probability task: one line
    that says what is needed, exit 1, before an epoch runs or anything is published."""
    registry = tmp_path / "registry"
    args = ["train", "--simulate", impressions, "--small", "--registry", str(registry)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    error = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and f"the {split} split" in error[0], result.output
    assert "needs both outcomes" in error[0] and "--simulate" in error[0]
    assert "Traceback" not in result.output and "epoch" not in result.output
    assert not Registry(registry).versions()


def test_any_domain_error_is_one_line_and_exit_1(registry: Path, tmp_path: Path) -> None:
    """Registry, bundle and snapshot errors all end in the one handler: ``error: ...``, exit 1."""
    r = str(registry)
    (registry / "versions" / "v2" / "manifest.json").write_text("{ not json")
    for args in (
        ["models", "show", "nosuch", "--registry", r],
        ["models", "activate", "v2", "--registry", r],
        ["models", "rollback", "--registry", r],
        ["features", "show", "nosuch", "--registry", r],
    ):
        out = fail(*args)
        assert out.startswith("error: ") and out.count("\n") == 1, (args, out)
