"""Alias transitions as pure functions of the aliases value, and the one artifact store's faults."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from model.core import aliases as t
from model.core.aliases import (
    MAX_PREVIOUS,
    Aliases,
    Canary,
    NothingToRollBack,
    RegistryError,
    RegistryUnavailable,
    Shadow,
)
from model.core.registry import Registry
from model.core.store.embedded import FeatureAliases, SnapshotStore, activate_snapshot
from model.core.store.snapshot import StoreUnavailable

NAMES = st.sampled_from(["v1", "v2", "v3", "v4", "v5"])
PERCENT = st.floats(min_value=0.5, max_value=100)


@st.composite
def aliases(draw: st.DrawFn) -> Aliases:
    """Any valid aliases value: production or none, a stack, maybe a canary and a shadow."""
    production = draw(st.none() | NAMES)
    previous = tuple(draw(st.lists(NAMES, max_size=MAX_PREVIOUS)))
    others = [n for n in ["v1", "v2", "v3", "v4", "v5"] if n != production]
    canary = shadow = None
    if production is not None:
        if draw(st.booleans()):
            canary = Canary(draw(st.sampled_from(others)), draw(PERCENT))
        if draw(st.booleans()):
            shadow = Shadow(draw(st.sampled_from(others)), draw(PERCENT))
    return Aliases(production, previous, canary, None, shadow)


@given(aliases(), NAMES)
def test_activate_pushes_the_old_production_and_clears_the_new_ones_other_roles(
    cur: Aliases, version: str
) -> None:
    new = t.activate(cur, version)
    assert new.production == version and len(new.previous) <= MAX_PREVIOUS
    if cur.production in (None, version):
        assert new.previous == cur.previous
    else:
        assert new.previous[-1] == cur.production
    for old, now in ((cur.canary, new.canary), (cur.shadow, new.shadow)):
        assert now == (None if old is not None and old.version == version else old)


@given(aliases(), NAMES)
def test_rollback_undoes_an_activation(cur: Aliases, version: str) -> None:
    if cur.production in (None, version) or len(cur.previous) == MAX_PREVIOUS:
        return  # nothing pushed, or the stack's bottom fell off
    back = t.rollback(t.activate(cur, version))
    assert (back.production, back.previous) == (cur.production, cur.previous)


@given(aliases())
def test_deactivate_then_rollback_restores_production(cur: Aliases) -> None:
    off = t.deactivate(cur)
    assert off.production is None and off.canary is None and off.shadow is None
    if cur.production is not None and len(cur.previous) < MAX_PREVIOUS:
        assert t.rollback(off).production == cur.production


def test_rollback_refuses_an_empty_stack_and_a_moved_target() -> None:
    with pytest.raises(NothingToRollBack):
        t.rollback(Aliases("v1"))
    with pytest.raises(RegistryError, match="changed from v1 to v2"):
        t.rollback(Aliases("v3", ("v1", "v2")), expected="v1")


@given(aliases(), NAMES, PERCENT)
def test_a_canary_or_shadow_needs_another_version_in_production(
    cur: Aliases, version: str, percent: float
) -> None:
    for setter, value in (
        (t.set_canary, Canary(version, percent)),
        (t.set_shadow, Shadow(version, percent)),
    ):
        if cur.production in (None, version):
            with pytest.raises(RegistryError):
                setter(cur, value)  # type: ignore[operator]
        else:
            new = setter(cur, value)  # type: ignore[operator]
            assert new.production == cur.production and new.previous == cur.previous


@given(aliases(), NAMES)
def test_remove_canary_only_removes_the_canary_it_judged(cur: Aliases, version: str) -> None:
    new = t.remove_canary(cur, version)
    if cur.canary is not None and cur.canary.version == version:
        assert new is not None and new.canary is None and new.shadow == cur.shadow
    else:
        assert new is None  # a newer canary (or none): nothing is written


@given(st.lists(NAMES, max_size=40))
def test_snapshot_activation_keeps_a_bounded_stack_without_repeats_of_the_active(
    names: list[str],
) -> None:
    cur = FeatureAliases(None)
    for name in names:
        new = activate_snapshot(cur, name)
        assert new.active == name and len(new.previous) <= MAX_PREVIOUS
        assert new.previous == t.push_previous(cur.previous, cur.active, name)
        cur = new


def refuse_lock(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """Make taking the store's lock fail as on a read-only volume (the error names the file)."""
    real_open = os.open

    def no_lock(path: Any, *args: Any, **kwargs: Any) -> int:
        if str(path).endswith(".lock"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_lock)


def test_both_stores_turn_an_unwritable_lock_into_unavailable_without_a_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    refuse_lock(monkeypatch, tmp_path)
    for call, error in (
        (lambda: Registry(tmp_path).clear_canary(), RegistryUnavailable),
        (lambda: SnapshotStore(tmp_path).check_writable(), StoreUnavailable),
    ):
        with pytest.raises(error) as e:
            call()
        assert "not writable" in str(e.value) and "Permission denied" in str(e.value)
        assert str(tmp_path) not in str(e.value)
