"""Ranking metrics in plain numpy: AUC, XAUC, RMSE, log loss, NDCG@k, top-k means, reliability
bins and ECE offline; and for comparing two rankers or two distributions online: Kendall's tau-b,
top-k overlap and the population stability index.

All functions take array-likes, flatten them to 1-D and validate that the lengths match. They are
exact (no sampling) and vectorised; the sort-based ones are O(n log n).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


def _as_1d(name: str, values: npt.ArrayLike) -> FloatArray:
    """Flatten to a 1-D float array, rejecting NaN so that rank ties stay well defined."""
    arr: FloatArray = np.asarray(values, dtype=np.float64).ravel()
    if np.isnan(arr).any():
        raise ValueError(f"{name} contains NaN")
    return arr


def _check_same_length(**arrays: np.ndarray) -> int:
    lengths = {name: len(arr) for name, arr in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"length mismatch: {lengths}")
    return next(iter(lengths.values()))


def _midranks(values: FloatArray) -> FloatArray:
    """1-based ranks of `values` where tied values share the mean of their ranks."""
    order = np.argsort(values, kind="stable")
    sorted_vals = values[order]
    # Start of each run of equal values, so every member of a run can get the run's mean rank.
    starts = np.flatnonzero(np.r_[True, sorted_vals[1:] != sorted_vals[:-1]])
    ends = np.r_[starts[1:], len(values)]
    run_rank = (starts + 1 + ends) / 2.0  # mean of the 1-based ranks starts+1 .. ends
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat(run_rank, ends - starts)
    return ranks


def auc(labels: npt.ArrayLike, scores: npt.ArrayLike) -> float:
    """ROC AUC via the Mann-Whitney U statistic; tied scores count one half.

    Returns NaN when only one class is present (AUC is undefined), so that evaluating a tiny
    validation split without positives does not crash a training run.
    """
    y = _as_1d("labels", labels)
    s = _as_1d("scores", scores)
    _check_same_length(labels=y, scores=s)
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0/1")
    n_pos = float(y.sum())
    n_neg = float(len(y) - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _midranks(s)
    u_stat = ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u_stat / (n_pos * n_neg))


def _count_ascending_pairs(perm: IntArray) -> int:
    """Number of index pairs j < i with perm[j] < perm[i], for a permutation of 0..n-1.

    MSD radix partition over the bits of the values: at each bit, within a group of values
    sharing the higher bits, every element with bit 1 is larger than every element with bit 0,
    so it forms an ascending pair with each bit-0 element that precedes it in index order.
    Groups are kept in index order by a stable partition, which costs O(n) per bit: O(n log n).
    """
    n = len(perm)
    if n < 2:
        return 0
    order = np.arange(n)  # element indices, grouped by the bits above the current one
    total = 0
    for bit in range(int(n - 1).bit_length() - 1, -1, -1):
        vals = perm[order]
        high = vals >> (bit + 1)
        is_one = ((vals >> bit) & 1).astype(bool)
        group_start = np.flatnonzero(np.r_[True, high[1:] != high[:-1]])
        sizes = np.diff(np.r_[group_start, n])
        start_of = np.repeat(group_start, sizes)
        zeros_incl = np.cumsum(~is_one)
        zeros_before_group = np.repeat(zeros_incl[group_start] - (~is_one[group_start]), sizes)
        zeros_before = zeros_incl - (~is_one) - zeros_before_group  # within group, exclusive
        total += int(zeros_before[is_one].sum())
        # Stable partition of each group: its zeros first, then its ones, both in index order.
        group_end = np.r_[group_start[1:], n] - 1
        zeros_in_group = np.repeat(zeros_incl[group_end], sizes) - zeros_before_group
        pos_in_group = np.arange(n) - start_of
        ones_before = pos_in_group - zeros_before
        new_pos = np.where(is_one, start_of + zeros_in_group + ones_before, start_of + zeros_before)
        new_order = np.empty_like(order)
        new_order[new_pos] = order
        order = new_order
    return total


def _concordant_pairs(y_true: FloatArray, y_pred: FloatArray) -> tuple[int, int]:
    """Count pairs with y_true[j] < y_true[i]: those with y_pred[j] < y_pred[i], and those tied.

    Elements are laid out by ascending y_true; ties in y_true are laid out by descending y_pred so
    that equal-y_true pairs never look ascending in y_pred. The ascending pairs of the y_pred
    ranks in this layout are then exactly the concordant pairs. Ranking equal predictions in
    layout order instead also counts every y_pred tie, including pairs equal in both coordinates,
    which sit next to each other in the layout and are subtracted.
    """
    layout = np.lexsort((-y_pred, y_true))
    pred = y_pred[layout]
    idx = np.arange(len(pred))
    strict_perm = np.empty(len(pred), dtype=np.int64)
    strict_perm[np.lexsort((-idx, pred))] = idx  # later equal prediction ranks lower
    loose_perm = np.empty(len(pred), dtype=np.int64)
    loose_perm[np.lexsort((idx, pred))] = idx  # later equal prediction ranks higher
    concordant = _count_ascending_pairs(strict_perm)
    truth = y_true[layout]
    new_run = np.r_[True, (pred[1:] != pred[:-1]) | (truth[1:] != truth[:-1])]
    run_sizes = np.diff(np.r_[np.flatnonzero(new_run), len(pred)])
    equal_in_both = int((run_sizes * (run_sizes - 1) // 2).sum())
    tied = _count_ascending_pairs(loose_perm) - equal_in_both - concordant
    return concordant, tied


def xauc(y_true: npt.ArrayLike, y_pred: npt.ArrayLike) -> float:
    """Pairwise ordering accuracy for a continuous target (e.g. watch time).

    Over all pairs with different y_true, the fraction whose y_pred is ordered the same way; a tie
    in y_pred counts one half. Exact, O(n log n) (no pair sampling). NaN when all y_true are equal.
    """
    t = _as_1d("y_true", y_true)
    p = _as_1d("y_pred", y_pred)
    n = _check_same_length(y_true=t, y_pred=p)
    _, true_counts = np.unique(t, return_counts=True)
    n_pairs = n * (n - 1) // 2 - int((true_counts * (true_counts - 1) // 2).sum())
    if n_pairs == 0:
        return float("nan")
    concordant, tied = _concordant_pairs(t, p)
    return float((concordant + 0.5 * tied) / n_pairs)


def rmse(y_true: npt.ArrayLike, y_pred: npt.ArrayLike) -> float:
    """Root mean squared error."""
    t = _as_1d("y_true", y_true)
    p = _as_1d("y_pred", y_pred)
    if _check_same_length(y_true=t, y_pred=p) == 0:
        raise ValueError("rmse of empty arrays")
    return float(np.sqrt(np.mean((t - p) ** 2)))


def log_loss(labels: npt.ArrayLike, probs: npt.ArrayLike, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy; probabilities are clipped to [eps, 1 - eps] to stay finite."""
    y = _as_1d("labels", labels)
    p = np.clip(_as_1d("probs", probs), eps, 1.0 - eps)
    if _check_same_length(labels=y, probs=p) == 0:
        raise ValueError("log_loss of empty arrays")
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def ece(labels: npt.ArrayLike, probs: npt.ArrayLike, n_bins: int = 10) -> float:
    """Expected calibration error over ``n_bins`` equal-mass bins of the predictions.

    ECE = sum_b (n_b / n) * |mean(p)_b - mean(y)_b| over the bins of ``reliability_bins`` (rows
    sorted by prediction, consecutive runs whose sizes differ by at most one). Equal-mass bins
    keep every bin populated for a rare event such as a like, where fixed-width bins would leave
    most of them empty.
    """
    bins = reliability_bins(labels, probs, n_bins)
    count = np.asarray(bins["count"])
    gap = np.abs(np.asarray(bins["mean_pred"]) - np.asarray(bins["mean_label"]))
    return float((count * gap).sum() / count.sum())


def ndcg_at_k(
    relevance_per_group: npt.ArrayLike,
    scores: npt.ArrayLike,
    groups: npt.ArrayLike,
    k: int = 10,
) -> float:
    """Mean NDCG@k over groups (requests), with linear gains on graded relevance.

    DCG@k = sum over the top-k items by score of rel / log2(position + 1). Relevance must be
    non-negative (graded labels or a continuous utility). Ties in scores are broken pessimistically
    (lower relevance first), so a constant scorer gets no credit for lucky input order. Groups
    whose relevance is all zero have no ideal ordering and are left out of the mean; NaN when no
    group is left.
    """
    if k < 1:
        raise ValueError("k must be >= 1")
    rel = _as_1d("relevance_per_group", relevance_per_group)
    s = _as_1d("scores", scores)
    group_codes = np.unique(np.asarray(groups).ravel(), return_inverse=True)[1].ravel()
    _check_same_length(relevance=rel, scores=s, groups=group_codes)
    if (rel < 0).any():
        raise ValueError("relevance must be non-negative")
    n_groups = int(group_codes.max()) + 1 if len(group_codes) else 0
    dcg = _dcg_per_group(rel, np.lexsort((rel, -s, group_codes)), group_codes, k, n_groups)
    ideal = _dcg_per_group(rel, np.lexsort((-rel, group_codes)), group_codes, k, n_groups)
    valid = ideal > 0
    if not valid.any():
        return float("nan")
    return float(np.mean(dcg[valid] / ideal[valid]))


def _dcg_per_group(
    rel: FloatArray, order: IntArray, group_codes: IntArray, k: int, n_groups: int
) -> FloatArray:
    """DCG@k per group given an ordering that is grouped by group code, best item first."""
    sorted_groups = group_codes[order]
    starts = np.flatnonzero(np.r_[True, sorted_groups[1:] != sorted_groups[:-1]])
    sizes = np.diff(np.r_[starts, len(order)])
    position = np.arange(len(order)) - np.repeat(starts, sizes)  # 0-based rank within group
    in_top = position < k
    gains = rel[order][in_top] / np.log2(position[in_top] + 2.0)
    dcg = np.bincount(sorted_groups[in_top], weights=gains, minlength=n_groups)
    return np.asarray(dcg, dtype=np.float64)


def kendall_tau(x: npt.ArrayLike, y: npt.ArrayLike) -> float:
    """Kendall's tau-b of two score vectors over the same items, exact in O(n log n).

    tau-b = (C - D) / sqrt((n0 - n1) (n0 - n2)) with C/D the concordant/discordant pairs, n0 all
    pairs and n1/n2 the pairs tied in x/y (scipy.stats.kendalltau's default variant). 1 means
    the same order, -1 the reverse. NaN when x or y is constant (or fewer than 2 items).
    """
    a = _as_1d("x", x)
    b = _as_1d("y", y)
    n = _check_same_length(x=a, y=b)
    n0 = n * (n - 1) // 2
    n1, n2 = _tied_pairs(a), _tied_pairs(b)
    if n0 - n1 == 0 or n0 - n2 == 0:
        return float("nan")
    concordant, y_tied = _concordant_pairs(a, b)  # over the pairs whose x differ
    discordant = n0 - n1 - concordant - y_tied
    return float((concordant - discordant) / np.sqrt(float(n0 - n1) * float(n0 - n2)))


def _tied_pairs(values: FloatArray) -> int:
    _, counts = np.unique(values, return_counts=True)
    return int((counts * (counts - 1) // 2).sum())


def top_k_overlap(order_a: npt.ArrayLike, order_b: npt.ArrayLike, k: int = 10) -> float:
    """|A_k ∩ B_k| / k for two rankings given as item indices, best first (k capped at n).

    1.0 when both rankings put the same items (in any order) in their first k places. NaN for
    empty rankings.
    """
    if k < 1:
        raise ValueError("k must be >= 1")
    a = np.asarray(order_a).ravel()
    b = np.asarray(order_b).ravel()
    n = _check_same_length(order_a=a, order_b=b)
    k = min(k, n)
    if k == 0:
        return float("nan")
    return float(np.intersect1d(a[:k], b[:k]).size / k)


def psi(expected: npt.ArrayLike, actual: npt.ArrayLike, eps: float = 1e-4) -> float:
    """Population stability index of binned counts: sum_b (q_b - p_b) ln(q_b / p_b).

    ``expected`` and ``actual`` are counts (or shares) over the same bins; each is normalised to
    shares, and empty bins count ``eps`` so that the log stays finite (a bin empty on both sides
    contributes 0). Conventional reading: < 0.1 stable, 0.1-0.25 moderate, > 0.25 a real shift.
    NaN when either side has no mass.
    """
    p = _as_1d("expected", expected)
    q = _as_1d("actual", actual)
    _check_same_length(expected=p, actual=q)
    if (p < 0).any() or (q < 0).any():
        raise ValueError("counts must be non-negative")
    p_total, q_total = p.sum(), q.sum()
    if p_total <= 0 or q_total <= 0:
        return float("nan")
    p = np.maximum(p / p_total, eps)
    q = np.maximum(q / q_total, eps)
    return float(np.sum((q - p) * np.log(q / p)))


def topk_mean(
    values: npt.ArrayLike, scores: npt.ArrayLike, groups: npt.ArrayLike, k: int = 10
) -> float:
    """Mean over groups of the mean of ``values`` among each group's top-k rows by score.

    E.g. the click rate in the top 10 of every user's list, averaged over users: a list with
    fewer than k rows contributes the mean over all of its rows. Ties in scores are broken
    pessimistically (lower value first), as in :func:`ndcg_at_k`. NaN for no rows.
    """
    if k < 1:
        raise ValueError("k must be >= 1")
    v = _as_1d("values", values)
    s = _as_1d("scores", scores)
    codes = np.unique(np.asarray(groups).ravel(), return_inverse=True)[1].ravel()
    _check_same_length(values=v, scores=s, groups=codes)
    if len(v) == 0:
        return float("nan")
    n_groups = int(codes.max()) + 1
    order = np.lexsort((v, -s, codes))
    sizes = np.bincount(codes, minlength=n_groups)
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    in_top = np.arange(len(order)) - starts[codes[order]] < k
    top_sum = np.bincount(codes[order][in_top], weights=v[order][in_top], minlength=n_groups)
    return float(np.mean(top_sum / np.minimum(sizes, k)))


def reliability_bins(
    labels: npt.ArrayLike, preds: npt.ArrayLike, n_bins: int = 10
) -> dict[str, list[float]]:
    """Reliability-diagram data over ``n_bins`` equal-mass bins of the predictions.

    The rows sorted by prediction are cut into consecutive runs whose sizes differ by at most
    one (equal mass keeps every bin populated for a rare event such as a like). Returns lists
    per bin: ``count``, ``mean_pred`` and ``mean_label``; the expected calibration error is
    ``sum(count * |mean_pred - mean_label|) / sum(count)``. ``labels`` may be 0/1 or any target
    whose mean the prediction estimates (e.g. watch seconds).
    """
    if n_bins < 1:
        raise ValueError("n_bins must be >= 1")
    y = _as_1d("labels", labels)
    p = _as_1d("preds", preds)
    n = _check_same_length(labels=y, preds=p)
    if n == 0:
        raise ValueError("reliability_bins of empty arrays")
    order = np.argsort(p, kind="stable")
    edges = np.linspace(0, n, min(n_bins, n) + 1).round().astype(np.int64)
    counts = np.diff(edges).astype(np.float64)
    mean_pred = np.add.reduceat(p[order], edges[:-1]) / counts
    mean_label = np.add.reduceat(y[order], edges[:-1]) / counts
    return {
        "count": counts.tolist(),
        "mean_pred": mean_pred.tolist(),
        "mean_label": mean_label.tolist(),
    }
