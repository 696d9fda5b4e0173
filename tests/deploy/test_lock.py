"""requirements.lock: exact versions for CI, the train image and the serve image.

The lock is pip-compile's output over every extra (``make lock``). These checks keep it honest:
consistent with pyproject.toml (every declared dependency pinned, within its specifier, extras'
own dependencies included), torch at the CPU 2.13.0 build with nothing of CUDA, this environment
installed from it, and every install path (Makefile, Dockerfile stages) constrained by it.
"""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements.lock"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)$")


def locked() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for raw in LOCK.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = PIN.match(line)
        assert m, f"not an exact pin: {raw!r}"
        name = canonicalize_name(m.group(1))
        assert name not in pins, f"pinned twice: {name}"
        pins[name] = Version(m.group(2))
    return pins


def declared() -> list[Requirement]:
    project = PYPROJECT["project"]
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs.extend(extra)
    return [Requirement(r) for r in reqs]


def test_every_declared_dependency_is_pinned_within_its_specifier() -> None:
    pins = locked()
    for req in declared():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req} is declared in pyproject.toml but not in the lock: make lock"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"lock pins {name}=={pins[name]}, outside pyproject's {req}: make lock"
        )


def test_requested_extras_of_dependencies_are_pinned() -> None:
    """uvicorn[standard] brings httptools (service/http/protocol.py extends it), uvloop..."""
    pins = locked()
    for req in declared():
        for extra in req.extras:
            for sub in metadata.requires(req.name) or []:
                dep = Requirement(sub)
                if dep.marker is not None and dep.marker.evaluate({"extra": extra}):
                    if dep.marker.evaluate({"extra": ""}):
                        continue  # not specific to the extra (e.g. a platform marker)
                    assert canonicalize_name(dep.name) in pins, f"{req.name}[{extra}]: {dep}"
    assert "httptools" in pins


def test_torch_is_the_cpu_build_without_cuda() -> None:
    pins = locked()
    torch = pins["torch"]
    assert torch.base_version == "2.13.0" and torch.local in (None, "cpu"), torch
    cuda = [n for n in pins if n.startswith(("nvidia-", "cuda-")) or n == "triton"]
    assert not cuda, cuda


def test_this_environment_is_installed_from_the_lock() -> None:
    """`make install` (what CI runs) installs exactly the locked versions."""
    wrong = {}
    for name, version in locked().items():
        try:
            installed = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            wrong[name] = (str(version), None)
            continue
        if installed != version:
            wrong[name] = (str(version), str(installed))
    assert not wrong, f"(locked, installed) differ - run `make install`: {wrong}"


@pytest.mark.parametrize("target", ["install", "lock"])
def test_makefile_installs_and_refreshes_from_the_lock(target: str) -> None:
    text = (ROOT / "Makefile").read_text()
    assert re.search(r"^LOCK\s*:?=\s*requirements\.lock$", text, re.M)
    if target == "install":
        (install,) = [ln for ln in text.splitlines() if "pip install" in ln and "-e '." in ln]
        assert "-c $(LOCK)" in install and "[serve,train,dev]" in install
        assert re.search(r"^\$\(BIN\)/\.installed: pyproject\.toml \$\(LOCK\)$", text, re.M)
    else:
        assert re.search(r"^lock: ", text, re.M) and re.search(r"^lock-upgrade: ", text, re.M)
        cmd = text[text.index("LOCK_CMD =") :].split("\n\n", 1)[0]
        for flag in ("pip-compile", "--extra serve", "--extra train", "--extra dev"):
            assert flag in cmd
        assert "pyproject.toml" in cmd and "--output-file $(LOCK)" in cmd


def test_both_images_install_from_the_lock() -> None:
    text = (ROOT / "Dockerfile").read_text()
    installs = re.findall(r"pip install [^\n&]*\[(?:serve|train)\]", text)
    assert len(installs) == 2, installs
    for cmd in installs:
        assert "-c /dist/requirements.lock" in cmd, cmd
    assert "cp requirements.lock /dist/" in text
    # torch alone comes from the CPU index, at the locked version, without its dependencies.
    (torch,) = re.findall(r"pip install --index-url \S+ [^\n]*torch[^\n]*", text)
    assert "--no-deps" in torch and f'"torch=={locked()["torch"]}"' in torch
