"""Metrics against brute-force definitions on small random inputs (with many ties)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.core.metrics import (
    _count_ascending_pairs,
    auc,
    ece,
    kendall_tau,
    log_loss,
    ndcg_at_k,
    psi,
    reliability_bins,
    rmse,
    top_k_overlap,
    topk_mean,
    xauc,
)


def brute_auc(labels: list[int], scores: list[float]) -> float:
    pos = [s for y, s in zip(labels, scores, strict=True) if y == 1]
    neg = [s for y, s in zip(labels, scores, strict=True) if y == 0]
    if not pos or not neg:
        return math.nan
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def brute_xauc(y_true: list[float], y_pred: list[float]) -> float:
    wins, pairs = 0.0, 0
    for i, j in itertools.permutations(range(len(y_true)), 2):
        if y_true[i] > y_true[j]:
            pairs += 1
            wins += 1.0 if y_pred[i] > y_pred[j] else 0.5 if y_pred[i] == y_pred[j] else 0.0
    return wins / pairs if pairs else math.nan


def brute_ece(labels: list[float], probs: list[float], n_bins: int) -> float:
    ranked = sorted(range(len(probs)), key=lambda i: probs[i])  # stable, like the metric
    n, k = len(probs), min(n_bins, len(probs))
    edges = [round(b * n / k) for b in range(k + 1)]  # equal mass, sizes differ by <= 1
    bins = {b: ranked[edges[b] : edges[b + 1]] for b in range(k)}
    total = 0.0
    for members in bins.values():
        mean_p = sum(probs[i] for i in members) / len(members)
        mean_y = sum(labels[i] for i in members) / len(members)
        total += len(members) / len(probs) * abs(mean_p - mean_y)
    return total


def brute_ndcg(rel: list[float], scores: list[float], groups: list[int], k: int) -> float:
    values = []
    for g in sorted(set(groups)):
        items = [(s, r) for s, r, gg in zip(scores, rel, groups, strict=True) if gg == g]
        ranked = sorted(items, key=lambda x: (-x[0], x[1]))  # pessimistic on score ties
        dcg = sum(r / math.log2(i + 2) for i, (_, r) in enumerate(ranked[:k]))
        ideal = sorted((r for _, r in items), reverse=True)
        idcg = sum(r / math.log2(i + 2) for i, r in enumerate(ideal[:k]))
        if idcg > 0:
            values.append(dcg / idcg)
    return sum(values) / len(values) if values else math.nan


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) < 1e-9


small_ints = st.lists(st.integers(0, 4), min_size=1, max_size=30)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), n=st.integers(1, 30))
def test_auc_matches_brute_force(data: st.DataObject, n: int) -> None:
    labels = data.draw(st.lists(st.integers(0, 1), min_size=n, max_size=n))
    scores = data.draw(st.lists(st.integers(0, 3).map(float), min_size=n, max_size=n))
    assert same(auc(labels, scores), brute_auc(labels, scores))


@settings(max_examples=200, deadline=None)
@given(data=st.data(), n=st.integers(1, 30))
def test_xauc_matches_brute_force(data: st.DataObject, n: int) -> None:
    y_true = data.draw(st.lists(st.integers(0, 5).map(float), min_size=n, max_size=n))
    y_pred = data.draw(st.lists(st.integers(0, 3).map(float), min_size=n, max_size=n))
    assert same(xauc(y_true, y_pred), brute_xauc(y_true, y_pred))


def test_xauc_continuous_values_and_extremes() -> None:
    rng = np.random.default_rng(3)
    y = rng.exponential(10.0, 60)
    p = y + rng.normal(0, 5.0, 60)
    assert same(xauc(y, p), brute_xauc(list(y), list(p)))
    assert xauc(y, y) == 1.0
    assert xauc(y, -y) == 0.0
    assert xauc(y, np.zeros_like(y)) == 0.5


@settings(max_examples=100, deadline=None)
@given(perm=st.permutations(list(range(12))))
def test_count_ascending_pairs(perm: list[int]) -> None:
    expected = sum(perm[j] < perm[i] for i in range(len(perm)) for j in range(i))
    assert _count_ascending_pairs(np.asarray(perm, dtype=np.int64)) == expected


@settings(max_examples=200, deadline=None)
@given(data=st.data(), n=st.integers(1, 40), k=st.integers(1, 6))
def test_ndcg_matches_brute_force(data: st.DataObject, n: int, k: int) -> None:
    rel = data.draw(st.lists(st.integers(0, 3).map(float), min_size=n, max_size=n))
    scores = data.draw(st.lists(st.integers(0, 4).map(float), min_size=n, max_size=n))
    groups = data.draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
    assert same(ndcg_at_k(rel, scores, groups, k=k), brute_ndcg(rel, scores, groups, k))


def test_ndcg_continuous_relevance_and_string_groups() -> None:
    rng = np.random.default_rng(7)
    rel = rng.random(200)
    scores = rel + rng.normal(0, 0.3, 200)
    groups = np.asarray([f"u{i % 9}" for i in range(200)])
    codes = [int(g[1:]) for g in groups]
    assert same(ndcg_at_k(rel, scores, groups), brute_ndcg(list(rel), list(scores), codes, 10))
    assert ndcg_at_k(rel, rel, groups) == pytest.approx(1.0)


def test_ndcg_ignores_groups_without_relevance_and_rejects_negatives() -> None:
    assert ndcg_at_k([0, 0, 1, 0], [1, 2, 0, 5], [0, 0, 1, 1], k=1) == 0.0
    assert math.isnan(ndcg_at_k([0, 0], [1, 2], [0, 0]))
    with pytest.raises(ValueError, match="non-negative"):
        ndcg_at_k([-1, 1], [1, 2], [0, 0])
    with pytest.raises(ValueError, match="k must"):
        ndcg_at_k([1], [1], [0], k=0)


@settings(max_examples=100, deadline=None)
@given(data=st.data(), n=st.integers(1, 30))
def test_rmse_and_log_loss_match_definitions(data: st.DataObject, n: int) -> None:
    floats = st.floats(0.0, 1.0, allow_nan=False)
    y = data.draw(st.lists(st.integers(0, 1), min_size=n, max_size=n))
    p = data.draw(st.lists(floats, min_size=n, max_size=n))
    squared = sum((a - b) ** 2 for a, b in zip(y, p, strict=True))
    assert rmse(y, p) == pytest.approx(math.sqrt(squared / n))
    clipped = [min(max(v, 1e-7), 1 - 1e-7) for v in p]
    expected = -sum(
        a * math.log(b) + (1 - a) * math.log(1 - b) for a, b in zip(y, clipped, strict=True)
    )
    assert log_loss(y, p) == pytest.approx(expected / n, rel=1e-9, abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), n=st.integers(1, 40), n_bins=st.integers(1, 12))
def test_ece_matches_brute_force(data: st.DataObject, n: int, n_bins: int) -> None:
    labels = data.draw(st.lists(st.sampled_from([0, 1]), min_size=n, max_size=n))
    probs = data.draw(st.lists(st.sampled_from([0.1, 0.25, 0.5, 0.9]), min_size=n, max_size=n))
    assert ece(labels, probs, n_bins) == pytest.approx(brute_ece(labels, probs, n_bins))


def test_ece_of_calibrated_shifted_and_rare_predictions() -> None:
    # Two groups predicted exactly at their positive rate: calibrated, ECE 0.
    labels = [1, 0, 0, 0] * 5 + [1, 1, 1, 0] * 5
    probs = [0.25] * 20 + [0.75] * 20
    assert ece(labels, probs, n_bins=2) == pytest.approx(0.0)
    # Every prediction 0.1 too high: ECE is that offset, whatever the binning.
    assert ece(labels, np.asarray(probs) + 0.1, n_bins=4) == pytest.approx(0.1)
    # A 2% event predicted 20% too high overall (the like head's failure mode) stands out of
    # the sampling noise of 200k rows (~0.0008).
    rng = np.random.default_rng(0)
    p = rng.uniform(0.0, 0.04, 200_000)
    y = rng.random(p.size) < p
    assert ece(y, p) < 0.0015 < ece(y, 1.2 * p)


def test_input_validation() -> None:
    assert math.isnan(auc([1, 1], [0.2, 0.3]))
    with pytest.raises(ValueError, match="length mismatch"):
        auc([0, 1], [0.1])
    with pytest.raises(ValueError, match="0/1"):
        auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        rmse([1.0], [float("nan")])
    with pytest.raises(ValueError, match="empty"):
        log_loss([], [])
    assert math.isnan(xauc([1.0, 1.0], [0.0, 1.0]))
    with pytest.raises(ValueError, match="empty"):
        ece([], [])
    with pytest.raises(ValueError, match="n_bins"):
        ece([1], [0.5], n_bins=0)


def test_large_inputs_are_fast_enough() -> None:
    rng = np.random.default_rng(0)
    n = 200_000
    y = rng.exponential(10.0, n)
    p = y + rng.normal(0, 10.0, n)
    value = xauc(y, p)
    # A seeded sample of pairs agrees with the exact count.
    i, j = rng.integers(0, n, (2, 200_000))
    keep = y[i] != y[j]
    sampled = np.mean((y[i] > y[j])[keep] == (p[i] > p[j])[keep])
    assert value == pytest.approx(sampled, abs=0.01)
    labels = (rng.random(n) < 0.3).astype(int)
    assert auc(labels, labels + rng.random(n)) == 1.0


def brute_tau_b(x: list[float], y: list[float]) -> float:
    """Kendall's tau-b from its definition over all pairs."""
    s = n1 = n2 = n0 = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        n0 += 1
        dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
        s += int(dx * dy)
        n1 += int(dx == 0)
        n2 += int(dy == 0)
    denom = math.sqrt((n0 - n1) * (n0 - n2))
    return s / denom if denom else math.nan


@given(data=st.data(), n=st.integers(0, 30))
@settings(max_examples=100, deadline=None)
def test_kendall_tau_matches_definition_with_ties(data: st.DataObject, n: int) -> None:
    values = st.lists(st.integers(0, 5).map(float), min_size=n, max_size=n)
    x, y = data.draw(values), data.draw(values)
    expected = brute_tau_b(x, y)
    got = kendall_tau(x, y)
    assert (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected, abs=1e-12)


def test_kendall_tau_extremes() -> None:
    x = np.arange(500, dtype=float)
    assert kendall_tau(x, x * 3 + 1) == pytest.approx(1.0)
    assert kendall_tau(x, -x) == pytest.approx(-1.0)
    swapped = x.copy()
    swapped[[0, 1]] = swapped[[1, 0]]  # one discordant pair of 124750
    assert kendall_tau(x, swapped) == pytest.approx(1 - 2 / (500 * 499 / 2))
    assert math.isnan(kendall_tau([1.0, 1.0], [1.0, 2.0]))  # a constant ranking
    with pytest.raises(ValueError, match="NaN"):
        kendall_tau([1.0, float("nan")], [1.0, 2.0])


def test_top_k_overlap() -> None:
    a = np.arange(20)
    assert top_k_overlap(a, a, 10) == 1.0
    assert top_k_overlap(a, a[::-1], 10) == 0.0
    b = np.r_[a[:5], a[10:15], a[5:10], a[15:]]  # half of the top 10 replaced
    assert top_k_overlap(a, b, 10) == 0.5
    assert top_k_overlap(a[:4], a[:4][::-1], 10) == 1.0  # k capped at n
    assert math.isnan(top_k_overlap([], [], 10))
    with pytest.raises(ValueError):
        top_k_overlap(a, a, 0)


def test_psi() -> None:
    p = np.array([10, 20, 30, 40])
    assert psi(p, p * 7) == pytest.approx(0.0)  # counts are normalised to shares
    q = np.array([40, 30, 20, 10])
    shares_p, shares_q = p / p.sum(), q / q.sum()
    expected = float(np.sum((shares_q - shares_p) * np.log(shares_q / shares_p)))
    assert psi(p, q) == pytest.approx(expected)
    assert psi(p, q) == pytest.approx(psi(q, p))  # symmetric
    # All mass moved into a bin that was empty: large, finite (eps stands in for 0).
    moved = psi([100, 0], [0, 100], eps=1e-4)
    assert moved == pytest.approx(2 * (1 - 1e-4) * math.log(1 / 1e-4))
    assert psi([0, 5, 0], [0, 9, 0]) == 0.0  # bins empty on both sides add nothing
    assert math.isnan(psi([0, 0], [1, 2]))
    with pytest.raises(ValueError):
        psi([1, -1], [1, 1])


def brute_topk_mean(values: list[float], scores: list[float], groups: list[int], k: int) -> float:
    means = []
    for g in sorted(set(groups)):
        items = [(s, v) for s, v, gg in zip(scores, values, groups, strict=True) if gg == g]
        top = sorted(items, key=lambda x: (-x[0], x[1]))[:k]  # pessimistic on score ties
        means.append(sum(v for _, v in top) / len(top))
    return sum(means) / len(means)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), n=st.integers(1, 40), k=st.integers(1, 6))
def test_topk_mean_matches_brute_force(data: st.DataObject, n: int, k: int) -> None:
    values = data.draw(st.lists(st.integers(0, 3).map(float), min_size=n, max_size=n))
    scores = data.draw(st.lists(st.integers(0, 4).map(float), min_size=n, max_size=n))
    groups = data.draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
    assert same(topk_mean(values, scores, groups, k), brute_topk_mean(values, scores, groups, k))


def test_reliability_bins_equal_mass_and_ece() -> None:
    rng = np.random.default_rng(3)
    preds = rng.random(1003)
    labels = (rng.random(1003) < preds).astype(float)
    bins = reliability_bins(labels, preds, n_bins=10)
    counts = np.asarray(bins["count"])
    assert counts.sum() == 1003 and counts.max() - counts.min() <= 1
    order = np.argsort(preds, kind="stable")
    first = order[: int(counts[0])]  # the lowest predictions form the first bin
    assert bins["mean_pred"][0] == pytest.approx(preds[first].mean())
    assert bins["mean_label"][0] == pytest.approx(labels[first].mean())
    assert np.all(np.diff(bins["mean_pred"]) > 0)
    # calibrated predictions: every bin's label mean sits near its prediction mean
    assert np.max(np.abs(np.subtract(bins["mean_pred"], bins["mean_label"]))) < 0.1
    few = reliability_bins([1.0, 0.0, 1.0], [0.2, 0.1, 0.9], n_bins=10)
    assert few["count"] == [1.0, 1.0, 1.0] and few["mean_label"] == [0.0, 1.0, 1.0]
    with pytest.raises(ValueError):
        reliability_bins([], [])
