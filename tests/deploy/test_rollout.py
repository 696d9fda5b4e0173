"""Multi-replica rollout for real: 3 `vidrank serve` processes behind real nginx on loopback.

Drives ``benchmarks/rollout.py`` (what ``make rollout`` shows) on a copy of the tiny registry:
with /rank traffic flowing through nginx it activates a second version with
``vidrank models activate``, SIGKILLs a replica, and rolls back with ``vidrank models rollback``.
Runs in the normal suite whenever nginx is installed (``.ci/run`` installs it); takes ~15 s.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import rollout
from benchmarks.harness import NGINX_MISSING, find_nginx, listening
from model.core.registry import Registry

pytestmark = pytest.mark.skipif(find_nginx() is None, reason=NGINX_MISSING)


@pytest.fixture
def registry(registry_copy: Path) -> Path:
    """A private copy of the tiny registry: the rollout publishes and changes aliases."""
    return registry_copy


def test_rollout_kill_and_rollback_behind_nginx(
    registry: Path, tiny_bundle: tuple[Path, str], tmp_path: Path
) -> None:
    first = tiny_bundle[1]
    cfg = rollout.RolloutConfig(registry=registry, workdir=tmp_path / "run")
    report = rollout.run_rollout(cfg)
    print(report.to_text())  # shown with -s, or on failure
    second = first + rollout.SECOND_SUFFIX
    baseline, activate, kill, rollback = (report.phase(n) for n in rollout.PHASES)

    # Traffic flowed through every phase.
    for phase in (baseline, activate, kill, rollback):
        assert phase.requests >= 20, phase

    # (1) Activation: every replica serves the new version within the poll interval (+ margin
    # for noticing, loading and warming it); not one request fails; once all have converged,
    # nothing answers with the old version any more (after a grace for requests in flight).
    assert set(activate.converge_s) == {"r0", "r1", "r2"}
    assert activate.max_converge_s is not None
    assert activate.max_converge_s <= cfg.converge_bound_s
    assert activate.failures == 0, report.errors
    assert activate.stale_after_converge == 0
    assert second in activate.versions

    # (2) SIGKILL of a replica: requests that were in flight on it, or that nginx sends to it
    # before it notices, fail at the connection level, and nginx resends them to another replica
    # (`proxy_next_upstream error timeout http_502 http_503 non_idempotent`, up to 3 tries;
    # POST /rank is idempotent), so the client sees no failure at all.
    assert report.killed == "r0"
    assert kill.failures == 0, report.errors
    assert set(kill.versions) == {second}

    # (3) Rollback: the two surviving replicas converge on the first version again.
    assert set(rollback.converge_s) == {"r1", "r2"}
    assert rollback.max_converge_s is not None
    assert rollback.max_converge_s <= cfg.converge_bound_s
    assert rollback.failures == 0, report.errors
    assert rollback.stale_after_converge == 0
    assert first in rollback.versions

    assert report.problems() == []
    aliases = Registry(registry).read_aliases()
    assert aliases.production == first and second in Registry(registry).versions()
    # Every process the run started is gone: no port is still served.
    assert not [name for name, port in report.ports.items() if listening(port)]
