"""Tests for model/core/fusion.py: methods, validation, profiles, hot reload and properties."""

from __future__ import annotations

import math
import os
import threading
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.core.fusion import (
    METHODS,
    TASKS,
    TRANSFORMS,
    FusionError,
    FusionSpec,
    ProfileStore,
    TaskTerm,
    fuse,
    fuse_lists,
    fuse_terms,
    parse_profiles,
    rank_order,
    resolve,
    task_ranks,
)

PROPERTY_SETTINGS = settings(max_examples=150, deadline=None)
FALLBACK = FusionSpec("weighted_sum", {"click": TaskTerm(1.0)}, name="bundle-default")
PROFILES_TOML = """\
default = "balanced"

[profiles.balanced]
method = "weighted_product"
weights = { click = 1.0, watch_time = { weight = 0.6, transform = "log1p" }, like = 0.4 }

[profiles.clicks]
method = "weighted_sum"
weights = { click = 1.0 }
"""


def preds_of(click: list[float], watch: list[float], like: list[float]) -> dict[str, np.ndarray]:
    """Prediction arrays as the scorer would hand them over (float32, like the ONNX outputs)."""
    return {
        "click": np.array(click, dtype=np.float32),
        "watch_time": np.array(watch, dtype=np.float32),
        "like": np.array(like, dtype=np.float32),
    }


def position(order: np.ndarray, index: int) -> int:
    """Position of candidate ``index`` in a rank order (0 = top)."""
    return int(np.flatnonzero(order == index)[0])


# --------------------------------------------------------------------------------------------
# Methods on hand-computed examples
# --------------------------------------------------------------------------------------------


def test_weighted_sum_hand_example() -> None:
    spec = FusionSpec(
        "weighted_sum",
        {
            "click": TaskTerm(1.0),
            "watch_time": TaskTerm(0.5, "scale", 60.0),
            "like": TaskTerm(2.0),
        },
    )
    preds = {
        "click": np.array([0.1, 0.5]),
        "watch_time": np.array([120.0, 30.0]),
        "like": np.array([0.0, 0.2]),
    }
    # c0: 0.1 + 0.5 * 120/60 + 2 * 0.0 = 1.1 ; c1: 0.5 + 0.5 * 30/60 + 2 * 0.2 = 1.15
    scores = fuse(spec, preds)
    assert scores.dtype == np.float64
    np.testing.assert_allclose(scores, [1.1, 1.15])
    np.testing.assert_array_equal(rank_order(scores), [1, 0])


def test_weighted_sum_log1p_transform() -> None:
    spec = FusionSpec("weighted_sum", {"watch_time": TaskTerm(2.0, "log1p")})
    scores = fuse(spec, {"watch_time": np.array([math.e - 1.0, 0.0])})
    np.testing.assert_allclose(scores, [2.0, 0.0])


def test_weighted_product_is_log_of_product() -> None:
    eps = 1e-6
    spec = FusionSpec(
        "weighted_product", {"click": TaskTerm(2.0), "like": TaskTerm(0.5)}, epsilon=eps
    )
    preds = {"click": np.array([0.5, 0.25]), "like": np.array([0.1, 0.4])}
    # products: (0.5+e)^2 (0.1+e)^0.5 ~ 0.0791 ; (0.25+e)^2 (0.4+e)^0.5 ~ 0.0395
    expected = [
        math.log((0.5 + eps) ** 2 * (0.1 + eps) ** 0.5),
        math.log((0.25 + eps) ** 2 * (0.4 + eps) ** 0.5),
    ]
    scores = fuse(spec, preds)
    np.testing.assert_allclose(scores, expected, rtol=1e-12)
    np.testing.assert_allclose(np.exp(scores), [0.0790569, 0.0395285], rtol=1e-5)
    np.testing.assert_array_equal(rank_order(scores), [0, 1])


def test_weighted_product_zero_prediction_stays_finite() -> None:
    spec = FusionSpec("weighted_product", {"like": TaskTerm(1.0)}, epsilon=1e-6)
    scores = fuse(spec, {"like": np.array([0.0, 1.0])})
    assert np.all(np.isfinite(scores))
    np.testing.assert_allclose(scores, [math.log(1e-6), math.log(1.0 + 1e-6)])


def test_rank_sum_hand_example_with_ties() -> None:
    spec = FusionSpec("rank_sum", {"click": TaskTerm(1.0), "like": TaskTerm(1.0)}, beta=1.0)
    preds = {"click": np.array([0.9, 0.1, 0.5]), "like": np.array([0.0, 0.3, 0.3])}
    # click ranks (0-based): c0=0, c2=1, c1=2. like: c1 and c2 tie at 0.3, input order decides:
    # c1=0, c2=1, c0=2. Scores: c0 = 1/1 + 1/3, c1 = 1/3 + 1/1, c2 = 1/2 + 1/2.
    np.testing.assert_array_equal(task_ranks(preds["like"]), [2, 0, 1])
    scores = fuse(spec, preds)
    np.testing.assert_allclose(scores, [4 / 3, 4 / 3, 1.0])
    assert scores[0] == scores[1]  # exact tie, so input order decides the final order too
    np.testing.assert_array_equal(rank_order(scores), [0, 1, 2])


def test_rank_sum_all_tied_keeps_input_order() -> None:
    spec = FusionSpec("rank_sum", {"click": TaskTerm(3.0)}, beta=2.0)
    scores = fuse(spec, {"click": np.full(4, 0.5)})
    np.testing.assert_allclose(scores, [3 / 2, 3 / 3, 3 / 4, 3 / 5])
    np.testing.assert_array_equal(rank_order(scores), [0, 1, 2, 3])


def test_rank_sum_ignores_transform() -> None:
    base = FusionSpec("rank_sum", {"watch_time": TaskTerm(1.0)})
    logged = FusionSpec("rank_sum", {"watch_time": TaskTerm(1.0, "log1p")})
    preds = {"watch_time": np.array([10.0, 300.0, 0.0])}
    np.testing.assert_array_equal(fuse(base, preds), fuse(logged, preds))


def test_absent_and_zero_weight_tasks_are_ignored() -> None:
    spec = FusionSpec("weighted_sum", {"click": TaskTerm(1.0), "like": TaskTerm(0.0)})
    assert spec.weight("watch_time") == 0.0
    assert spec.weight("like") == 0.0
    # neither watch_time nor like is needed, not even for length checks
    np.testing.assert_allclose(fuse(spec, {"click": np.array([0.2, 0.7])}), [0.2, 0.7])


@pytest.mark.parametrize("method", METHODS)
def test_empty_and_single_candidate(method: str) -> None:
    spec = FusionSpec(method, {"click": TaskTerm(1.0), "watch_time": TaskTerm(0.5, "log1p")})
    empty = fuse(spec, preds_of([], [], []))
    assert empty.shape == (0,) and empty.dtype == np.float64
    assert rank_order(empty).shape == (0,)
    one = fuse(spec, preds_of([0.3], [42.0], [0.1]))
    assert one.shape == (1,) and np.isfinite(one[0])
    np.testing.assert_array_equal(rank_order(one), [0])


def test_mismatched_prediction_lengths_raise() -> None:
    spec = FusionSpec("weighted_sum", {"click": TaskTerm(1.0), "like": TaskTerm(1.0)})
    with pytest.raises(ValueError, match="different lengths"):
        fuse(spec, {"click": np.zeros(3), "like": np.zeros(2)})
    with pytest.raises(ValueError, match="lack task 'like'"):
        fuse(spec, {"click": np.zeros(3)})


def test_rank_order_stable_and_nan_last() -> None:
    scores = np.array([1.0, np.nan, -np.inf, 1.0, np.nan, 2.0, 0.0, -0.0])
    np.testing.assert_array_equal(rank_order(scores), [5, 0, 3, 6, 7, 2, 1, 4])


def test_rank_order_stable_on_large_inputs() -> None:
    # numpy's quicksort falls back to (stable) insertion sort below 16 elements, so only a large
    # input shows that the sort really is stable.
    scores = np.random.default_rng(0).integers(0, 5, size=2000).astype(np.float64)
    expected = np.concatenate([np.flatnonzero(scores == v) for v in (4.0, 3.0, 2.0, 1.0, 0.0)])
    np.testing.assert_array_equal(rank_order(scores), expected)


def test_rank_sum_ties_on_large_inputs() -> None:
    values = np.random.default_rng(1).integers(0, 3, size=500).astype(np.float64)
    ranks = task_ranks(values)
    expected = np.empty(500)
    expected[np.concatenate([np.flatnonzero(values == v) for v in (2.0, 1.0, 0.0)])] = np.arange(
        500
    )
    np.testing.assert_array_equal(ranks, expected)


# --------------------------------------------------------------------------------------------
# Dict form and validation errors
# --------------------------------------------------------------------------------------------


def test_from_dict_parses_bare_numbers_and_tables() -> None:
    spec = FusionSpec.from_dict(
        {
            "method": "weighted_sum",
            "weights": {
                "click": 1,
                "watch_time": {"weight": 0.5, "transform": "scale", "scale": 60},
                "like": {"weight": 2.0, "transform": "log1p"},
            },
            "epsilon": 1e-4,
            "beta": 5,
        }
    )
    assert spec.terms["click"] == TaskTerm(1.0)
    assert spec.terms["watch_time"] == TaskTerm(0.5, "scale", 60.0)
    assert spec.terms["like"] == TaskTerm(2.0, "log1p")
    assert (spec.epsilon, spec.beta) == (1e-4, 5.0)


def test_dict_round_trip() -> None:
    spec = FusionSpec(
        "weighted_product",
        {"click": TaskTerm(1.0), "watch_time": TaskTerm(0.6, "log1p"), "like": TaskTerm(0.4)},
        epsilon=1e-3,
        name="balanced",
    )
    d = spec.to_dict()
    assert d["weights"] == {
        "click": 1.0,
        "watch_time": {"weight": 0.6, "transform": "log1p"},
        "like": 0.4,
    }
    assert FusionSpec.from_dict(d) == spec
    assert hash(FusionSpec.from_dict(d)) == hash(spec)


def test_spec_terms_are_read_only_copy() -> None:
    terms = {"click": TaskTerm(1.0)}
    spec = FusionSpec("weighted_sum", terms)
    terms["like"] = TaskTerm(5.0)
    assert "like" not in spec.terms
    with pytest.raises(TypeError):
        spec.terms["like"] = TaskTerm(5.0)  # type: ignore[index]


def _ws(weights: Any, **extra: Any) -> dict[str, Any]:
    """A weighted_sum dict-form spec with ``weights`` and extra keys."""
    return {"method": "weighted_sum", "weights": weights, **extra}


@pytest.mark.parametrize(
    ("d", "field"),
    [
        (_ws({"clik": 1.0}), "fusion.weights.clik"),
        ({"method": "weighted_max", "weights": {"click": 1.0}}, "fusion.method"),
        ({"method": 3, "weights": {"click": 1.0}}, "fusion.method"),
        ({"weights": {"click": 1.0}}, "fusion.method"),
        ({"method": "weighted_sum"}, "fusion.weights"),
        (_ws([1.0]), "fusion.weights"),
        (_ws({}), "fusion.weights"),
        (_ws({"click": 0.0}), "fusion.weights"),
        (_ws({"click": 1.0}, wieghts={}), "fusion.wieghts"),
        (_ws({"like": float("nan")}), "fusion.weights.like"),
        (_ws({"like": float("inf")}), "fusion.weights.like"),
        (_ws({"like": True}), "fusion.weights.like"),
        (_ws({"like": "1.0"}), "fusion.weights.like"),
        (_ws({"watch_time": {"transform": "log1p"}}), "fusion.weights.watch_time.weight"),
        (_ws({"watch_time": {"weight": "x"}}), "fusion.weights.watch_time.weight"),
        (
            _ws({"watch_time": {"weight": 1.0, "transform": "sqrt"}}),
            "fusion.weights.watch_time.transform",
        ),
        (
            _ws({"watch_time": {"weight": 1.0, "transform": "scale", "scale": 0}}),
            "fusion.weights.watch_time.scale",
        ),
        (
            _ws({"watch_time": {"weight": 1.0, "transform": "log1p", "scale": 60}}),
            "fusion.weights.watch_time.scale",
        ),
        (_ws({"watch_time": {"weight": 1.0, "shift": 2}}), "fusion.weights.watch_time.shift"),
        (_ws({"click": 1.0}, epsilon=0.0), "fusion.epsilon"),
        (_ws({"click": 1.0}, epsilon="small"), "fusion.epsilon"),
        (_ws({"click": 1.0}, beta=-1.0), "fusion.beta"),
        (_ws({"click": 1.0}, name=7), "fusion.name"),
        ("weighted_sum", "fusion"),
    ],
)
def test_from_dict_errors_name_the_field(d: Any, field: str) -> None:
    with pytest.raises(FusionError) as info:
        FusionSpec.from_dict(d)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")


def test_from_dict_uses_field_prefix() -> None:
    with pytest.raises(FusionError) as info:
        FusionSpec.from_dict(_ws({"clik": 1.0}), field_prefix="default_fusion")
    assert info.value.field == "default_fusion.weights.clik"


def test_direct_construction_validates() -> None:
    with pytest.raises(FusionError) as info:
        FusionSpec("weighted_max", {"click": TaskTerm(1.0)})
    assert info.value.field == "fusion.method"
    with pytest.raises(FusionError) as info:
        FusionSpec("weighted_sum", {"clik": TaskTerm(1.0)})
    assert info.value.field == "fusion.weights.clik"
    with pytest.raises(FusionError):
        TaskTerm(1.0, "sqrt")
    with pytest.raises(FusionError):
        TaskTerm(math.inf)
    with pytest.raises(FusionError):
        TaskTerm(1.0, "scale", -60.0)


# --------------------------------------------------------------------------------------------
# Profiles and hot reload
# --------------------------------------------------------------------------------------------


class FakeClock:
    """A manually advanced monotonic clock."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def write_profiles(path: Path, text: str, stamp: int) -> None:
    """Replace the file atomically, as operators should, with a distinct mtime ``stamp`` seconds
    after a fixed epoch (so a coarse-mtime filesystem cannot hide the change)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    ns = (1_700_000_000 + stamp) * 1_000_000_000
    os.utime(tmp, ns=(ns, ns))
    os.replace(tmp, path)


@pytest.fixture()
def profile_file(tmp_path: Path) -> Path:
    path = tmp_path / "profiles.toml"
    write_profiles(path, PROFILES_TOML, 0)
    return path


def test_profiles_load(profile_file: Path) -> None:
    store = ProfileStore(profile_file, FALLBACK, clock=FakeClock())
    assert store.names() == ["balanced", "clicks"]
    assert store.default_name == "balanced"
    assert (store.last_error, store.reloads, store.reload_failures) == (None, 1, 0)
    balanced = store.get("balanced")
    assert balanced.name == "balanced"
    assert balanced.method == "weighted_product"
    assert balanced.terms["watch_time"] == TaskTerm(0.6, "log1p")
    assert store.get(None) == balanced
    assert store.get("clicks").to_dict()["weights"] == {"click": 1.0}


def test_profiles_without_default_use_fallback(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    write_profiles(path, PROFILES_TOML.replace('default = "balanced"\n', ""), 0)
    store = ProfileStore(path, FALLBACK, clock=FakeClock())
    assert store.get(None) == FALLBACK
    other = FusionSpec("rank_sum", {"like": TaskTerm(1.0)})
    assert store.get(None, fallback=other) == other


def test_unknown_profile_names_field(profile_file: Path) -> None:
    store = ProfileStore(profile_file, FALLBACK, clock=FakeClock())
    with pytest.raises(FusionError) as info:
        store.get("nope")
    assert info.value.field == "fusion.profile"
    assert "balanced" in info.value.message


def test_no_path_means_fallback_only() -> None:
    store = ProfileStore(None, FALLBACK)
    assert store.names() == []
    assert store.get(None) == FALLBACK
    assert store.last_error is None


def test_hot_reload_after_interval(profile_file: Path) -> None:
    clock = FakeClock()
    store = ProfileStore(profile_file, FALLBACK, clock=clock)
    new_text = PROFILES_TOML + '\n[profiles.fresh]\nmethod = "rank_sum"\nweights = { like = 1 }\n'
    write_profiles(profile_file, new_text, 10)
    clock.advance(0.5)  # within the check interval: the file is not even stat'ed
    with pytest.raises(FusionError):
        store.get("fresh")
    clock.advance(0.5)
    assert store.get("fresh").method == "rank_sum"
    assert store.names() == ["balanced", "clicks", "fresh"]
    assert (store.reloads, store.reload_failures) == (2, 0)


def test_hot_reload_same_size_new_mtime(profile_file: Path) -> None:
    clock = FakeClock()
    store = ProfileStore(profile_file, FALLBACK, clock=clock)
    changed = PROFILES_TOML.replace("like = 0.4", "like = 0.9")
    assert len(changed) == len(PROFILES_TOML)
    write_profiles(profile_file, changed, 20)
    clock.advance(1.0)
    assert store.get("balanced").weight("like") == 0.9


def test_unchanged_file_is_not_reloaded(profile_file: Path) -> None:
    clock = FakeClock()
    store = ProfileStore(profile_file, FALLBACK, clock=clock)
    for _ in range(3):
        clock.advance(5.0)
        store.get(None)
    assert store.reloads == 1


def test_broken_file_keeps_last_good(profile_file: Path) -> None:
    clock = FakeClock()
    store = ProfileStore(profile_file, FALLBACK, clock=clock)
    write_profiles(profile_file, "default = [[[ not toml", 30)
    clock.advance(1.0)
    assert store.get("balanced").method == "weighted_product"
    assert store.get(None).name == "balanced"
    assert store.last_error is not None and str(profile_file) in store.last_error
    assert (store.reloads, store.reload_failures) == (1, 1)
    clock.advance(1.0)  # the same broken file is not retried (and not counted) again
    store.get(None)
    assert store.reload_failures == 1
    write_profiles(profile_file, PROFILES_TOML.replace('"balanced"\n', '"clicks"\n', 1), 31)
    clock.advance(1.0)
    assert store.get(None).name == "clicks"
    assert store.last_error is None and store.reloads == 2


def test_failures_reach_the_callback_without_a_fallback(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    failures: list[str] = []
    clock = FakeClock()
    store = ProfileStore(path, clock=clock, on_failure=failures.append)  # missing at start
    assert len(failures) == 1 and str(path) in failures[0]
    with pytest.raises(FusionError) as info:  # no default profile, no fallback
        store.get(None)
    assert info.value.field == "fusion.profile"
    assert store.get(None, fallback=FALLBACK) == FALLBACK
    write_profiles(path, PROFILES_TOML, 10)
    clock.advance(1.0)
    assert store.get(None).name == "balanced" and len(failures) == 1
    write_profiles(path, "default = [[[ not toml", 20)
    clock.advance(1.0)
    assert store.get(None).name == "balanced"  # the last good profiles stay
    assert len(failures) == 2 and failures[1] == store.last_error


def test_empty_file_is_a_failed_reload(profile_file: Path) -> None:
    # what a reader sees between the truncate and the write of a non-atomic rewrite
    clock = FakeClock()
    store = ProfileStore(profile_file, FALLBACK, clock=clock)
    profile_file.write_text("")
    os.utime(profile_file, ns=(1, 1))
    clock.advance(1.0)
    assert store.names() == ["balanced", "clicks"]
    assert store.last_error is not None and "empty" in store.last_error
    assert store.reload_failures == 1


def test_tuning_records_are_accepted_and_ignored() -> None:
    text = PROFILES_TOML + "[tuning.balanced]\nvalue = 0.8\n[tuning.balanced.objective]\nk = 10\n"
    specs, default = parse_profiles(tomllib.loads(text))
    assert list(specs) == ["balanced", "clicks"] and default == "balanced"
    with pytest.raises(FusionError) as err:
        parse_profiles(tomllib.loads('tuning = "x"\n' + PROFILES_TOML))
    assert err.value.field == "tuning"


@pytest.mark.parametrize(
    ("text", "where"),
    [
        (
            '[profiles.x]\nmethod = "weighted_sum"\nweights = { clik = 1 }\n',
            "profiles.x.weights.clik",
        ),
        ('[profiles.x]\nmethod = "max"\nweights = { click = 1 }\n', "profiles.x.method"),
        ('default = "y"\n[profiles.x]\nmethod = "rank_sum"\nweights = { click = 1 }\n', "default"),
        ('[profile.x]\nmethod = "rank_sum"\nweights = { click = 1 }\n', "profile"),
    ],
)
def test_invalid_profile_keeps_last_good(profile_file: Path, text: str, where: str) -> None:
    clock = FakeClock()
    store = ProfileStore(profile_file, FALLBACK, clock=clock)
    write_profiles(profile_file, text, 40)
    clock.advance(1.0)
    assert store.names() == ["balanced", "clicks"]
    assert store.last_error is not None and f"{where}: " in store.last_error


def test_missing_file_at_start_then_created(tmp_path: Path) -> None:
    clock = FakeClock()
    path = tmp_path / "later.toml"
    store = ProfileStore(path, FALLBACK, clock=clock)
    assert store.names() == []
    assert store.get(None) == FALLBACK
    assert store.last_error is not None and store.reload_failures == 1
    write_profiles(path, PROFILES_TOML, 50)
    clock.advance(1.0)
    assert store.get(None).name == "balanced"
    assert store.last_error is None


def test_deleted_file_keeps_last_good(profile_file: Path) -> None:
    clock = FakeClock()
    store = ProfileStore(profile_file, FALLBACK, clock=clock)
    profile_file.unlink()
    clock.advance(1.0)
    assert store.get("clicks").method == "weighted_sum"
    assert store.last_error is not None and store.reload_failures == 1


def test_forced_reload_ignores_interval(profile_file: Path) -> None:
    store = ProfileStore(profile_file, FALLBACK, clock=FakeClock())
    write_profiles(profile_file, PROFILES_TOML.replace("like = 0.4", "like = 0.7"), 60)
    assert store.reload() is True
    assert store.get("balanced").weight("like") == 0.7
    assert store.reload() is False


def test_concurrent_get_during_reloads(profile_file: Path) -> None:
    store = ProfileStore(profile_file, FALLBACK, check_interval_s=0.0)
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        try:
            while not stop.is_set():
                assert store.get("balanced").method == "weighted_product"
        except BaseException as exc:  # noqa: BLE001 - collected and re-raised by the test
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for stamp in range(1, 21):
        weight = 0.1 * stamp
        write_profiles(profile_file, PROFILES_TOML.replace("like = 0.4", f"like = {weight}"), stamp)
    stop.set()
    for t in threads:
        t.join()
    assert not errors
    store.reload()
    assert store.get("balanced").weight("like") == pytest.approx(2.0)


# --------------------------------------------------------------------------------------------
# resolve()
# --------------------------------------------------------------------------------------------


def test_resolve(profile_file: Path) -> None:
    store = ProfileStore(profile_file, FALLBACK, clock=FakeClock())
    bundle_default = FusionSpec("weighted_sum", {"like": TaskTerm(1.0)})
    assert resolve(store, None, bundle_default).name == "balanced"
    assert resolve(None, None, bundle_default) == bundle_default
    assert resolve(store, "clicks", bundle_default).name == "clicks"
    assert resolve(store, {"profile": "clicks"}, bundle_default).name == "clicks"
    inline = resolve(store, _ws({"like": 2.0}), bundle_default)
    assert inline.terms == {"like": TaskTerm(2.0)}
    assert resolve(store, inline, bundle_default) is inline


def test_resolve_without_file_default_uses_bundle_default(tmp_path: Path) -> None:
    store = ProfileStore(tmp_path / "missing.toml", FALLBACK, clock=FakeClock())
    bundle_default = FusionSpec("weighted_sum", {"like": TaskTerm(1.0)})
    assert resolve(store, None, bundle_default) == bundle_default


@pytest.mark.parametrize(
    ("request_fusion", "field"),
    [
        ("nope", "fusion.profile"),
        ({"profile": "nope"}, "fusion.profile"),
        ({"profile": 3}, "fusion.profile"),
        ({"profile": "clicks", "method": "weighted_sum"}, "fusion"),
        ({"method": "weighted_sum", "weights": {"clik": 1}}, "fusion.weights.clik"),
        (42, "fusion"),
    ],
)
def test_resolve_errors(profile_file: Path, request_fusion: Any, field: str) -> None:
    store = ProfileStore(profile_file, FALLBACK, clock=FakeClock())
    with pytest.raises(FusionError) as info:
        resolve(store, request_fusion, FALLBACK)
    assert info.value.field == field


def test_resolve_profile_without_store() -> None:
    with pytest.raises(FusionError) as info:
        resolve(None, "balanced", FALLBACK)
    assert info.value.field == "fusion.profile"


# --------------------------------------------------------------------------------------------
# Property tests
# --------------------------------------------------------------------------------------------

# Valid ranges, with a few round values mixed in so that ties are common.
PROB = st.one_of(st.sampled_from([0.0, 0.25, 0.5, 1.0]), st.floats(0.0, 1.0))
WATCH = st.one_of(st.sampled_from([0.0, 30.0, 600.0]), st.floats(0.0, 600.0))
RANGES = {"click": PROB, "watch_time": WATCH, "like": PROB}
UPPER = {"click": 1.0, "watch_time": 600.0, "like": 1.0}


@st.composite
def predictions(draw: st.DrawFn) -> dict[str, np.ndarray]:
    """1..12 candidates with predictions in their valid ranges."""
    n = draw(st.integers(1, 12))
    return {
        task: np.array(draw(st.lists(RANGES[task], min_size=n, max_size=n)), dtype=np.float64)
        for task in TASKS
    }


@st.composite
def task_terms(draw: st.DrawFn, positive: bool) -> TaskTerm:
    """A term with a non-negative (or, if ``positive``, strictly positive) weight."""
    weight = draw(st.floats(1e-3, 10.0) if positive else st.floats(0.0, 10.0))
    transform = draw(st.sampled_from(TRANSFORMS))
    scale = draw(st.sampled_from([0.5, 60.0])) if transform == "scale" else 1.0
    return TaskTerm(weight, transform, scale)


@st.composite
def specs(draw: st.DrawFn, method: str, positive_task: str) -> FusionSpec:
    """A spec whose ``positive_task`` has a positive weight; other tasks may be absent."""
    terms = {
        task: draw(task_terms(positive=task == positive_task))
        for task in TASKS
        if task == positive_task or draw(st.booleans())
    }
    epsilon = draw(st.sampled_from([1e-6, 1e-3, 0.1]))
    beta = draw(st.sampled_from([0.5, 1.0, 60.0]))
    return FusionSpec(method, terms, epsilon=epsilon, beta=beta)


@PROPERTY_SETTINGS
@given(data=st.data(), method=st.sampled_from(METHODS), task=st.sampled_from(TASKS))
def test_raising_a_prediction_never_lowers_rank(
    data: st.DataObject, method: str, task: str
) -> None:
    # Why this holds exactly, even in floating point and with ties: every transform, log(.+eps),
    # multiplication by w >= 0 and the fixed-order sum over tasks are monotone in IEEE
    # arithmetic, so the raised candidate's score cannot go down and no other score changes
    # (weighted_sum / weighted_product). For rank_sum, raising p_ik cannot worsen i's stable
    # task-k rank and cannot improve anyone else's, so s_i cannot fall and no s_j can rise.
    # With a stable order, a candidate only moves down if someone overtakes it strictly, or
    # an earlier-input candidate newly ties it -- both need s_i down or s_j up.
    spec = data.draw(specs(method, task))
    preds = data.draw(predictions())
    i = data.draw(st.integers(0, len(preds[task]) - 1))
    new_value = data.draw(st.floats(float(preds[task][i]), UPPER[task]))
    raised = {k: v.copy() for k, v in preds.items()}
    raised[task][i] = new_value
    before = position(rank_order(fuse(spec, preds)), i)
    after = position(rank_order(fuse(spec, raised)), i)
    assert after <= before


def _scaled(spec: FusionSpec, c: float) -> FusionSpec:
    """``spec`` with every weight multiplied by ``c``."""
    terms = {
        t: TaskTerm(term.weight * c, term.transform, term.scale) for t, term in spec.terms.items()
    }
    return FusionSpec(spec.method, terms, epsilon=spec.epsilon, beta=spec.beta)


# Exact variant. Multiplying by a power of two only changes the binary exponent, so as long as
# nothing is subnormal (c * w) * t == c * (w * t) and fl(c*a + c*b) == c * fl(a + b): the scaled
# scores are exactly c times the originals and the order -- ties included -- must be identical.
# Predictions and weights are drawn from coarse grids so no product is anywhere near subnormal.
GRID_PROB = st.integers(0, 64).map(lambda k: k / 64)
GRID_WATCH = st.integers(0, 40).map(lambda k: k * 15.0)
GRID_RANGES = {"click": GRID_PROB, "watch_time": GRID_WATCH, "like": GRID_PROB}


@st.composite
def grid_case(draw: st.DrawFn) -> tuple[FusionSpec, dict[str, np.ndarray]]:
    """A weighted_sum spec with grid weights and grid predictions (1..12 candidates)."""
    n = draw(st.integers(1, 12))
    preds = {
        task: np.array(draw(st.lists(GRID_RANGES[task], min_size=n, max_size=n))) for task in TASKS
    }
    terms = {}
    for task in TASKS:
        weight = draw(st.integers(0, 80)) / 8
        transform = draw(st.sampled_from(TRANSFORMS))
        scale = 60.0 if transform == "scale" else 1.0
        terms[task] = TaskTerm(weight, transform, scale)
    if all(term.weight == 0.0 for term in terms.values()):
        terms["click"] = TaskTerm(1.0)
    return FusionSpec("weighted_sum", terms), preds


@PROPERTY_SETTINGS
@given(case=grid_case(), c=st.sampled_from([0.25, 0.5, 2.0, 4.0, 1024.0]))
def test_weighted_sum_power_of_two_scaling_keeps_order_exactly(
    case: tuple[FusionSpec, dict[str, np.ndarray]], c: float
) -> None:
    spec, preds = case
    scores = fuse(spec, preds)
    scaled = fuse(_scaled(spec, c), preds)
    np.testing.assert_array_equal(scaled, c * scores)
    np.testing.assert_array_equal(rank_order(scaled), rank_order(scores))


def _sorts_descending_up_to_ties(order: np.ndarray, scores: np.ndarray) -> bool:
    """True if ``order`` lists ``scores`` descending, allowing swaps within a rounding tolerance."""
    ordered = scores[order]
    tol = 1e-12 * max(1.0, float(np.max(np.abs(scores))))
    return bool(np.all(ordered[:-1] - ordered[1:] >= -tol))


# General variant. For c such as 0.1, 3 or 10, (c * w) * t is rounded differently from w * t, so
# two candidates whose scores agree to the last few ulps (or tie exactly) may swap. The ranking
# must still be the same up to such near-ties: the order produced with scaled weights must sort
# the unscaled scores descending within a relative tolerance of 1e-12 (and vice versa).
@PROPERTY_SETTINGS
@given(
    data=st.data(),
    task=st.sampled_from(TASKS),
    c=st.sampled_from([0.1, 0.5, 2.0, 3.0, 10.0]),
)
def test_weighted_sum_scaling_keeps_order_up_to_ties(
    data: st.DataObject, task: str, c: float
) -> None:
    spec = data.draw(specs("weighted_sum", task))
    preds = data.draw(predictions())
    scores = fuse(spec, preds)
    scaled = fuse(_scaled(spec, c), preds)
    assert _sorts_descending_up_to_ties(rank_order(scaled), scores)
    assert _sorts_descending_up_to_ties(rank_order(scores), scaled / c)


@st.composite
def grouped_predictions(draw: st.DrawFn) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Predictions of 1..30 rows that belong to 1..4 interleaved lists (group labels)."""
    n = draw(st.integers(1, 30))
    preds = {
        task: np.array(draw(st.lists(RANGES[task], min_size=n, max_size=n)), dtype=np.float64)
        for task in TASKS
    }
    groups = np.array(draw(st.lists(st.sampled_from("abcd"), min_size=n, max_size=n)))
    return preds, groups


@PROPERTY_SETTINGS
@given(data=st.data(), method=st.sampled_from(METHODS), task=st.sampled_from(TASKS))
def test_fuse_lists_equals_fuse_on_each_list(data: st.DataObject, method: str, task: str) -> None:
    # fuse_lists is what offline evaluation and tune-fusion rank with: for every method it must
    # give each list exactly the scores the service gives that list as one request.
    preds, groups = data.draw(grouped_predictions())
    spec = data.draw(specs(method, task))
    scores = fuse_lists(spec, preds, groups)
    for group in np.unique(groups):
        rows = groups == group
        expected = fuse(spec, {t: p[rows] for t, p in preds.items()})
        np.testing.assert_array_equal(scores[rows], expected)


def test_fuse_lists_ranks_within_lists() -> None:
    spec = FusionSpec.from_dict({"method": "rank_sum", "weights": {"click": 1.0}})
    preds = {"click": np.array([0.9, 0.1, 0.5, 0.2])}
    scores = fuse_lists(spec, preds, np.array(["u", "v", "u", "v"]))
    # each list's best candidate has rank 0 (score 1/(0+1)); fuse over all four would not
    np.testing.assert_array_equal(scores, [1.0, 0.5, 0.5, 1.0])
    with pytest.raises(ValueError, match="groups"):
        fuse_lists(spec, preds, np.array(["u", "v"]))


# --------------------------------------------------------------------------------------------
# Explanations: per-task terms that add up to the score
# --------------------------------------------------------------------------------------------

EXPLAINED = [
    FusionSpec.from_dict(
        {"method": "weighted_sum", "weights": {"like": 2.0, "click": 1.0,
         "watch_time": {"weight": 0.5, "transform": "scale", "scale": 60}}}
    ),
    FusionSpec.from_dict(
        {"method": "weighted_product", "epsilon": 1e-3, "weights": {"click": 1.0,
         "watch_time": {"weight": 0.6, "transform": "log1p"}, "like": 0.4}}
    ),
    FusionSpec.from_dict({"method": "rank_sum", "beta": 2.0, "weights": {"click": 1, "like": 3}}),
]  # fmt: skip


@pytest.mark.parametrize("spec", EXPLAINED, ids=lambda s: s.method)
def test_terms_add_up_to_the_score(spec: FusionSpec) -> None:
    rng = np.random.default_rng(3)
    preds = preds_of(
        rng.uniform(0, 1, 200).tolist(),
        rng.exponential(30, 200).tolist(),
        rng.uniform(0, 0.1, 200).tolist(),
    )
    score, terms = fuse_terms(spec, preds)
    np.testing.assert_array_equal(score, fuse(spec, preds))
    assert set(terms) == {t for t, term in spec.terms.items() if term.weight != 0}
    # Added in TASKS order (what a client adds from the response) the terms give the score exactly.
    total = np.zeros(200)
    for task in TASKS:
        total = total + terms.get(task, 0.0)
    np.testing.assert_array_equal(total, score)


def test_terms_are_the_documented_formulas() -> None:
    preds = preds_of([0.2, 0.5], [30.0, 0.0], [0.01, 0.1])
    ws, wp, rs = EXPLAINED
    _, t = fuse_terms(ws, preds)
    np.testing.assert_allclose(t["watch_time"], 0.5 * np.array([30.0, 0.0]) / 60)
    np.testing.assert_allclose(t["like"], 2.0 * np.array([0.01, 0.1], dtype=np.float32))
    _, t = fuse_terms(wp, preds)
    np.testing.assert_allclose(t["watch_time"], 0.6 * np.log(np.log1p([30.0, 0.0]) + 1e-3))
    _, t = fuse_terms(rs, preds)
    np.testing.assert_allclose(t["click"], [1 / (1 + 2.0), 1 / (0 + 2.0)])
    np.testing.assert_allclose(t["like"], [3 / (1 + 2.0), 3 / (0 + 2.0)])
    assert fuse_terms(ws, preds_of([], [], []))[1] == {}


# --------------------------------------------------------------------------------------------
# Scores are always finite (a NaN score used to reach clients as "score": null)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("d", "field"),
    [
        (
            _ws(
                {
                    "click": {"weight": -1e308, "transform": "scale", "scale": 1e-300},
                    "watch_time": 1e308,
                }
            ),
            "fusion.weights.click.weight",
        ),
        (_ws({"click": 1e6 + 1}), "fusion.weights.click"),
        (_ws({"like": -2e6}), "fusion.weights.like"),
        (
            _ws({"watch_time": {"weight": 1.0, "transform": "scale", "scale": 1e-320}}),
            "fusion.weights.watch_time.scale",
        ),
        ({"method": "rank_sum", "weights": {"click": 1.0}, "beta": 1e-320}, "fusion.beta"),
    ],
)
def test_weights_that_could_overflow_are_rejected(d: Any, field: str) -> None:
    with pytest.raises(FusionError) as info:
        FusionSpec.from_dict(d)
    assert info.value.field == field


bounded_weights = st.floats(-1e6, 1e6, allow_nan=False) | st.sampled_from([-1e6, 1e6, 5e-324])
terms = st.builds(
    lambda w, transform, scale: (
        {"weight": w, "transform": transform} | ({"scale": scale} if transform == "scale" else {})
    ),
    bounded_weights,
    st.sampled_from(TRANSFORMS),
    st.floats(1e-6, 1e300) | st.just(1e-6),
)
valid_specs = st.fixed_dictionaries(
    {
        "method": st.sampled_from(METHODS),
        "weights": st.dictionaries(st.sampled_from(TASKS), terms, min_size=1),
        "epsilon": st.floats(5e-324, 1e300, exclude_min=False) | st.just(5e-324),
        "beta": st.floats(1e-6, 1e300) | st.just(1e-6),
    }
)
F32_MAX = float(np.finfo(np.float32).max)


@PROPERTY_SETTINGS
@given(
    d=valid_specs,
    click=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=6),
    watch=st.lists(st.floats(0.0, F32_MAX) | st.just(F32_MAX), min_size=6, max_size=6),
    like=st.lists(st.floats(0.0, 1.0), min_size=6, max_size=6),
)
def test_any_valid_spec_gives_finite_scores(
    d: dict[str, Any], click: list[float], watch: list[float], like: list[float]
) -> None:
    # The heads emit probabilities and non-negative float32 seconds: whatever weights a valid
    # spec holds, every fused score is a finite number.
    try:
        spec = FusionSpec.from_dict(d)
    except FusionError:  # e.g. all weights zero: refused, fine
        return
    n = len(click)
    scores = fuse(spec, preds_of(click, watch[:n], like[:n]))
    assert np.isfinite(scores).all(), (d, scores)
