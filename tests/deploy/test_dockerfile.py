"""Static checks of the Dockerfile (no Docker daemon needed).

A small parser splits the Dockerfile into stages (`FROM image AS name`) and instructions, with
line continuations and comments handled, and follows `FROM <stage>` chains so that a stage
"inherits" what its parents did (the user created in `base`, the venv's PATH ...).
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

# Every setting an operator can pass (service/settings.py; docs/internals.md).
SETTINGS_ENV = {f"VIDRANK_{name.upper()}" for name in Settings.model_fields}


# --------------------------------------------------------------------------------------------
# parser
# --------------------------------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str  # upper-case: RUN, ENV, USER ...
    args: str  # raw argument text, continuations joined
    flags: dict[str, str] = field(default_factory=dict)  # --mount=..., --interval=... (leading)
    line: int = 0


@dataclass
class Stage:
    name: str
    image: str  # what FROM names: an image or an earlier stage
    index: int
    instructions: list[Instruction] = field(default_factory=list)

    def of(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """Join backslash continuations; drop comments and blank lines (parser directives too)."""
    out: list[tuple[int, str]] = []
    buf: list[str] = []
    start = 0
    for no, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not buf):
            # Comment lines inside a continuation are skipped by Docker as well.
            continue
        if not buf:
            start = no
        if raw.rstrip().endswith("\\"):
            buf.append(raw.rstrip()[:-1])
            continue
        buf.append(raw)
        out.append((start, " ".join(part.strip() for part in buf if part.strip())))
        buf = []
    if buf:
        out.append((start, " ".join(part.strip() for part in buf)))
    return out


_FLAG_RE = re.compile(r"^--([a-z-]+)=(\S+)\s*")


def parse_dockerfile(text: str) -> list[Stage]:
    stages: list[Stage] = []
    for line_no, line in _logical_lines(text):
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        rest = rest.strip()
        if keyword == "FROM":
            m = re.match(r"^(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?\s*$", rest, re.I)
            assert m, f"line {line_no}: cannot parse FROM {rest!r}"
            image, name = m.group(1), m.group(2) or str(len(stages))
            stages.append(Stage(name=name.lower(), image=image, index=len(stages)))
            continue
        assert stages, f"line {line_no}: {keyword} before the first FROM"
        flags: dict[str, str] = {}
        if keyword in {"RUN", "COPY", "ADD", "HEALTHCHECK"}:
            while m := _FLAG_RE.match(rest):
                flags[m.group(1)] = m.group(2)
                rest = rest[m.end() :]
        stages[-1].instructions.append(Instruction(keyword, rest, flags, line_no))
    return stages


def exec_form(instr: Instruction) -> list[str]:
    """The JSON array of an exec-form instruction; fails the test for shell form."""
    try:
        value = json.loads(instr.args)
    except json.JSONDecodeError:
        pytest.fail(f"line {instr.line}: {instr.keyword} is not exec form: {instr.args!r}")
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), instr.args
    return value


def env_pairs(instr: Instruction) -> dict[str, str]:
    """ENV k=v k2="v 2" (modern form) or ENV k v (legacy single pair)."""
    tokens = shlex.split(instr.args)
    if tokens and "=" not in tokens[0]:
        return {tokens[0]: " ".join(tokens[1:])}
    return dict(tok.split("=", 1) for tok in tokens)


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stages() -> dict[str, Stage]:
    parsed = parse_dockerfile(DOCKERFILE.read_text())
    by_name = {s.name: s for s in parsed}
    assert len(by_name) == len(parsed), "duplicate stage names"
    return by_name


def chain(stages: dict[str, Stage], name: str) -> list[Stage]:
    """The stage and its FROM-ancestors that are stages of this file, root first."""
    out: list[Stage] = []
    cur: Stage | None = stages[name]
    while cur is not None:
        out.append(cur)
        cur = stages.get(cur.image.lower())
    return list(reversed(out))


def chain_instructions(stages: dict[str, Stage], name: str) -> list[Instruction]:
    return [i for s in chain(stages, name) for i in s.instructions]


def pip_installs(instructions: list[Instruction]) -> list[str]:
    """Every `pip install ...` command found in RUN instructions (split on &&, ;)."""
    cmds: list[str] = []
    for instr in instructions:
        if instr.keyword != "RUN":
            continue
        for part in re.split(r"&&|;|\|\|", instr.args):
            if re.search(r"\bpip3?\s+install\b", part):
                cmds.append(part.strip())
    return cmds


# --------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------


def test_parser_handles_continuations_and_flags() -> None:
    text = (
        "# syntax=docker/dockerfile:1.7\n"
        "FROM python:3.11-slim AS base\n"
        "ENV A=1 \\\n"
        "    B=2\n"
        "FROM base AS x\n"
        "RUN --mount=type=bind,from=build,source=/d,target=/d \\\n"
        "    # a comment inside\n"
        "    pip install foo\n"
        'ENTRYPOINT ["a", "b"]\n'
    )
    parsed = parse_dockerfile(text)
    assert [s.name for s in parsed] == ["base", "x"]
    assert env_pairs(parsed[0].instructions[0]) == {"A": "1", "B": "2"}
    run = parsed[1].instructions[0]
    assert run.flags == {"mount": "type=bind,from=build,source=/d,target=/d"}
    assert run.args == "pip install foo"
    assert exec_form(parsed[1].instructions[1]) == ["a", "b"]


def test_stages_and_base_image(stages: dict[str, Stage]) -> None:
    assert {"base", "build", "serve", "train"} <= set(stages)
    assert stages["base"].image == "python:3.11-slim"
    for name in ("build", "serve", "train"):
        assert chain(stages, name)[0].name == "base", f"{name} must derive from base"
    base_env: dict[str, str] = {}
    for instr in stages["base"].of("ENV"):
        base_env.update(env_pairs(instr))
    assert base_env.get("PYTHONDONTWRITEBYTECODE") == "1"
    assert base_env.get("PYTHONUNBUFFERED") == "1"
    assert base_env.get("VIRTUAL_ENV") == "/opt/venv"
    assert base_env.get("PATH", "").startswith("/opt/venv/bin:")
    assert any("venv /opt/venv" in i.args for i in stages["base"].of("RUN"))


def test_serve_is_default_target(stages: dict[str, Stage]) -> None:
    # `docker build .` builds the last stage: that must be the serving image.
    assert max(stages.values(), key=lambda s: s.index).name == "serve"


def test_build_stage_builds_the_wheel(stages: dict[str, Stage]) -> None:
    runs = " ".join(i.args for i in stages["build"].of("RUN"))
    assert re.search(r"pip3? wheel .*--no-deps", runs) or "python -m build" in runs
    copied = " ".join(i.args for i in stages["build"].of("COPY"))
    for src in ("pyproject.toml", "model/", "service/"):
        assert src in copied


def test_copied_sources_are_not_dockerignored(stages: dict[str, Stage]) -> None:
    patterns = [
        p.strip()
        for p in DOCKERIGNORE.read_text().splitlines()
        if p.strip() and not p.strip().startswith("#")
    ]
    for required in (".venv", ".git", "registry", "data", "__pycache__", "*.pyc", ".pytest_cache"):
        assert any(required in p for p in patterns), f".dockerignore lacks {required}"
    for instr in stages["build"].of("COPY"):
        *sources, _dest = shlex.split(instr.args)
        for src in sources:
            src = src.rstrip("/")
            for pat in patterns:
                if pat.startswith("!"):
                    continue
                assert not fnmatch.fnmatch(src, pat.rstrip("/")), f"{src} excluded by {pat}"


def _last_user(instructions: list[Instruction]) -> tuple[str | None, int]:
    user, pos = None, -1
    for n, instr in enumerate(instructions):
        if instr.keyword == "USER":
            user, pos = instr.args.strip(), n
    return user, pos


@pytest.mark.parametrize("target", ["serve", "train"])
def test_runs_as_non_root(stages: dict[str, Stage], target: str) -> None:
    instrs = chain_instructions(stages, target)
    user, user_pos = _last_user(instrs)
    assert user is not None, f"{target}: no USER"
    uid = user.split(":")[0]
    assert uid not in {"root", "0"}, f"{target}: USER {user}"
    entry_pos = max(n for n, i in enumerate(instrs) if i.keyword == "ENTRYPOINT")
    assert user_pos < entry_pos, f"{target}: USER must come before ENTRYPOINT"
    # The uid the k8s manifests use (runAsUser 10001) is created in the image.
    assert uid in {"10001", "vidrank"}
    runs = " ".join(i.args for i in instrs if i.keyword == "RUN")
    assert re.search(r"useradd .*--uid 10001", runs), "uid 10001 is never created"
    # /registry exists and belongs to that user (named volumes inherit it) and is a VOLUME.
    assert re.search(r"chown 10001(:10001)? /registry", runs)
    assert any("/registry" in i.args for i in instrs if i.keyword == "VOLUME")


def test_serve_entrypoint_env_and_port(stages: dict[str, Stage]) -> None:
    serve = stages["serve"]
    (entry,) = serve.of("ENTRYPOINT")
    assert exec_form(entry) == ["vidrank", "serve"]
    env: dict[str, str] = {}
    for instr in serve.of("ENV"):
        env.update(env_pairs(instr))
    assert env["VIDRANK_REGISTRY"] == "/registry"
    assert env["VIDRANK_HOST"] == "0.0.0.0"
    assert env["VIDRANK_PORT"] == "8000"
    assert env["VIDRANK_WORKERS"] == "2"
    assert [i.args for i in serve.of("EXPOSE")] == ["8000"]
    assert any(i.args.strip() == "/registry" for i in serve.of("VOLUME"))


def test_env_names_are_settings(stages: dict[str, Stage]) -> None:
    for stage in stages.values():
        for instr in stage.of("ENV"):
            for name in env_pairs(instr):
                if name.startswith("VIDRANK_"):
                    assert name in SETTINGS_ENV, f"stage {stage.name}: unknown setting {name}"


def test_serve_healthcheck(stages: dict[str, Stage]) -> None:
    (hc,) = stages["serve"].of("HEALTHCHECK")
    assert hc.args.startswith("CMD")
    cmd = hc.args[len("CMD") :].strip()
    text = " ".join(json.loads(cmd)) if cmd.startswith("[") else cmd
    assert "/healthz" in text
    assert "urllib" in text and "127.0.0.1" in text
    assert "curl" not in text  # not in python:3.11-slim
    for flag in ("interval", "timeout", "start-period", "retries"):
        assert flag in hc.flags


def test_serve_installs_serve_extra_and_never_torch(stages: dict[str, Stage]) -> None:
    installs = pip_installs(chain_instructions(stages, "serve"))
    assert any("[serve]" in cmd for cmd in installs), installs
    for cmd in installs:
        assert "torch" not in cmd, f"serve chain installs torch: {cmd}"
        assert "[train]" not in cmd and "[dev]" not in cmd, cmd
        assert "download.pytorch.org" not in cmd
    # ... and the build proves it: a RUN that fails when torch is importable.
    runs = [i.args for i in stages["serve"].of("RUN")]
    assert any("find_spec('torch')" in r and "sys.exit" in r for r in runs), runs


def test_train_pins_cpu_torch(stages: dict[str, Stage]) -> None:
    installs = pip_installs(chain_instructions(stages, "train"))
    torch_cmds = [c for c in installs if "torch" in c]
    assert torch_cmds, installs
    assert any("torch==2.13.0" in c for c in torch_cmds)
    assert any("download.pytorch.org/whl/cpu" in c for c in torch_cmds)
    assert any("[train]" in c for c in installs)
    train = stages["train"]
    (entry,) = train.of("ENTRYPOINT")
    assert exec_form(entry) == ["vidrank"]
    (cmd,) = train.of("CMD")
    assert exec_form(cmd) == ["train", "--registry", "/registry", "--simulate", "200000"]


def test_wheel_comes_from_build_stage(stages: dict[str, Stage]) -> None:
    # serve and train install the wheel built once in `build`, not the source tree.
    for target in ("serve", "train"):
        mounts = [i.flags.get("mount", "") for i in stages[target].of("RUN")]
        copies = [i for i in stages[target].of("COPY") if i.flags.get("from") == "build"]
        assert any("from=build" in m for m in mounts) or copies, target
