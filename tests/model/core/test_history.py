"""The registry's audit trail: one history line per aliases change, concurrent writers included."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from model.core.history import ACTIONS, MAX_REASON_CHARS, History, history_line
from model.core.policy import CanaryPolicy, InvalidPolicy
from model.core.registry import (
    Canary,
    InvalidShadow,
    Registry,
    RegistryError,
    Shadow,
    VersionNotFound,
)
from tests.model.core.test_registry import PROC_TIMEOUT_S, make_src, run_processes


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    r = Registry(tmp_path / "registry")
    src = make_src(tmp_path / "src", "base")
    for name in ("v1", "v2", "v3"):
        r.publish(src, name)
    return r


def changes(reg: Registry) -> list[tuple[Any, ...]]:
    return [(h["action"], h["actor"], h["from"], h["to"]) for h in reg.history.read()]


def test_every_kind_of_change_is_recorded_with_actor_and_reason(reg: Registry) -> None:
    reg.activate("v1", actor="cli", reason="first")
    reg.activate("v2", actor="admin-api")
    reg.set_canary("v3", 10, actor="admin-api", reason="try v3")
    reg.set_shadow("v1", 50, actor="cli")
    reg.remove_canary("v3", reason="psi: PSI of like 9.2 > 0.25")
    reg.set_canary("v3", 20, actor="cli")
    reg.clear_canary(actor="cli", reason="done")
    reg.clear_shadow(actor="admin-api")
    reg.rollback(actor="cli", reason="v2 is worse")
    reg.deactivate(actor="cli", reason="incident")
    assert changes(reg) == [
        ("activate", "cli", None, "v1"),
        ("activate", "admin-api", "v1", "v2"),
        ("canary_set", "admin-api", None, "v3"),
        ("shadow_set", "cli", None, "v1"),
        ("auto_rollback", "auto-rollback", "v3", None),
        ("canary_set", "cli", None, "v3"),
        ("canary_clear", "cli", "v3", None),
        ("shadow_clear", "admin-api", "v1", None),
        ("rollback", "cli", "v2", "v1"),
        ("deactivate", "cli", "v1", None),
    ]
    lines = reg.history.read()
    assert {h["action"] for h in lines} == set(ACTIONS)
    assert [h.get("percent") for h in lines[2:4]] == [10.0, 50.0]
    assert [h["reason"] for h in lines][:3] == ["first", None, "try v3"]
    assert lines[4]["reason"].startswith("psi:")
    assert all(h["time"].endswith("Z") for h in lines)
    # Times are the aliases' updated_at of each change, so they are in order.
    assert [h["time"] for h in lines] == sorted(h["time"] for h in lines)
    assert lines[-1]["time"] == reg.read_aliases().updated_at


def test_failed_changes_are_not_recorded(reg: Registry) -> None:
    with pytest.raises(VersionNotFound):
        reg.activate("nope")
    with pytest.raises(RegistryError, match="no production"):
        reg.set_shadow("v1", 10)
    reg.activate("v1")
    with pytest.raises(RegistryError, match="already production"):
        reg.set_shadow("v1", 10)
    with pytest.raises(InvalidShadow):
        reg.set_shadow("v2", 0)
    assert changes(reg) == [("activate", "library", None, "v1")]


def test_remove_canary_only_removes_the_version_judged(reg: Registry) -> None:
    reg.activate("v1")
    assert reg.remove_canary("v2") is None  # no canary: nothing written
    reg.set_canary("v2", 10)
    reg.set_canary("v3", 10)  # an operator replaced it before the judge acted
    stamp = reg.aliases_stamp()
    assert reg.remove_canary("v2", reason="late verdict") is None
    assert reg.aliases_stamp() == stamp and reg.read_aliases().canary == Canary("v3", 10)
    a = reg.remove_canary("v3", reason="p99_latency")
    assert a is not None and a.canary is None and a.production == "v1"
    assert [c[0] for c in changes(reg)] == ["activate", "canary_set", "canary_set", "auto_rollback"]


def test_shadow_and_canary_policy_in_aliases(reg: Registry) -> None:
    reg.activate("v1")
    policy = CanaryPolicy(max_psi=0.2, min_requests=50)
    reg.set_canary("v2", 25, policy)
    reg.set_shadow("v3", 100)
    raw = json.loads(reg.aliases_path.read_text())
    assert raw["canary"] == {"version": "v2", "percent": 25.0, "policy": policy.to_dict()}
    assert raw["shadow"] == {"version": "v3", "percent": 100.0}
    a = reg.read_aliases()
    assert a.canary == Canary("v2", 25, policy) and a.shadow == Shadow("v3", 100)
    # Activating the shadowed version ends the shadow (and the canary of it, likewise).
    a = reg.activate("v3")
    assert a.shadow is None and a.canary == Canary("v2", 25, policy)
    a = reg.activate("v2")
    assert a.canary is None


def test_policy_validation_names_the_field() -> None:
    assert CanaryPolicy(max_psi=0.3).over(CanaryPolicy(0.1, 2.0, 0.25, 100, 60)) == CanaryPolicy(
        0.1, 2.0, 0.3, 100, 60
    )
    for bad, field in (
        ({"max_psi": -1}, "policy.max_psi"),
        ({"max_error_ratio": 2}, "policy.max_error_ratio"),
        ({"min_requests": 0}, "policy.min_requests"),
        ({"min_requests": 1.5}, "policy.min_requests"),
        ({"window_s": float("inf")}, "policy.window_s"),
        ({"max_p99": 2}, "policy.max_p99"),
    ):
        with pytest.raises(InvalidPolicy) as e:
            CanaryPolicy.from_dict(bad)
        assert e.value.field == field
    with pytest.raises(RegistryError):
        Canary.from_dict({"version": "v2", "percent": 5, "policy": {"max_psi": "high"}})


def test_history_line_checks_and_truncates() -> None:
    line = history_line("t", "activate", "cli", "a", "b", "x" * 2000)
    assert len(line["reason"]) == MAX_REASON_CHARS
    with pytest.raises(ValueError):
        history_line("t", "deploy", "cli", None, "b")
    with pytest.raises(ValueError):
        history_line("t", "activate", "someone", None, "b")


def test_tail_reads_the_end_and_skips_a_torn_line(tmp_path: Path) -> None:
    h = History(tmp_path / "history.jsonl")
    assert h.read() == [] and h.tail(5) == []
    lines = [
        history_line(f"t{i:05d}", "activate", "cli", None, f"v{i}", "r" * 40) for i in range(2999)
    ]
    h.path.write_text("".join(json.dumps(line) + "\n" for line in lines))  # ~ 300 KB
    h.append(history_line("t02999", "activate", "cli", None, "v2999", "last"))
    with open(h.path, "ab") as f:
        f.write(b'{"time": "t-torn", "act')  # a crash mid-append
    assert [x["to"] for x in h.tail(3)] == ["v2997", "v2998", "v2999"]
    assert len(h.tail(2500)) == 2500 and h.tail(2500)[0]["to"] == "v500"
    assert len(h.read()) == 3000


def _change_worker(root: str, worker: int, rounds: int, barrier: Any, out: Any) -> None:
    """One process of an operator team: canary and shadow changes, then one activation."""
    reg = Registry(root)
    barrier.wait(timeout=PROC_TIMEOUT_S)
    try:
        done = 0
        for i in range(rounds):
            reg.set_canary("v2", 1 + worker, actor="cli", reason=f"w{worker} r{i}")
            reg.set_shadow("v3", 1 + worker, actor="admin-api", reason=f"w{worker} r{i}")
            reg.clear_canary(actor="cli", reason=f"w{worker} r{i}")
            reg.clear_shadow(actor="admin-api", reason=f"w{worker} r{i}")
            done += 4
        out.put(("ok", done))
    except Exception as e:
        out.put(("error", repr(e)))


def test_concurrent_writers_lose_no_history_line(reg: Registry) -> None:
    reg.activate("v1")
    workers, rounds = 4, 5
    results = run_processes(_change_worker, [(str(reg.root), w, rounds) for w in range(workers)])
    assert all(status == "ok" for status, _ in results), results
    lines = reg.history.read()
    raw = reg.history.path.read_bytes().splitlines()
    assert len(raw) == len(lines) == 1 + workers * rounds * 4  # every line whole, none lost
    for w in range(workers):
        mine = [h for h in lines if (h["reason"] or "").startswith(f"w{w} ")]
        # Each worker's changes appear in its own order, four per round.
        assert [h["reason"] for h in mine] == [
            f"w{w} r{i}" for i in range(rounds) for _ in range(4)
        ]
        assert [h["action"] for h in mine[:4]] == [
            "canary_set", "shadow_set", "canary_clear", "shadow_clear"
        ]  # fmt: skip
    # Lines are in lock order: each clear's "from" is what the line before left in that role.
    canary: str | None = None
    for h in lines:
        if h["action"].startswith("canary"):
            assert h["from"] == canary
            canary = h["to"]
    a = reg.read_aliases()
    assert a.canary is None and a.shadow is None and a.production == "v1"
