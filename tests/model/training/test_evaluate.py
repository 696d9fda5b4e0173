"""The trainer's default fusion ranks by the expected utility the evaluation measures against."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from model.core.fusion import FusionSpec, fuse
from model.core.tasks import TASKS, TRUTH_COLUMNS
from model.simulator.world import DEFAULT_UTILITY_WEIGHTS, true_utility
from model.training.evaluate import DEFAULT_FUSION, PRODUCT_FUSION, ranking_eval, utility_fusion


def truth_of(frame: pd.DataFrame) -> dict[str, np.ndarray]:
    return {t: frame[c].to_numpy(dtype=np.float64) for t, c in TRUTH_COLUMNS.items()}


def test_the_default_fusion_is_the_expected_utility(tiny_frame: pd.DataFrame) -> None:
    truth = truth_of(tiny_frame)
    score = fuse(FusionSpec.from_dict(DEFAULT_FUSION), truth)
    # the fused truth is the utility itself, term by term
    np.testing.assert_allclose(score, true_utility(tiny_frame), rtol=1e-12)
    assert DEFAULT_FUSION == utility_fusion(DEFAULT_UTILITY_WEIGHTS)
    other = {"click": 2.0, "watch_time": 0.05, "like": 5.0}
    np.testing.assert_allclose(
        fuse(FusionSpec.from_dict(utility_fusion(other)), truth),
        true_utility(tiny_frame, other),
        rtol=1e-12,
    )


def test_ranking_eval_reports_the_default_and_the_product_beside_it(
    tiny_frame: pd.DataFrame,
) -> None:
    truth = truth_of(tiny_frame)
    m = ranking_eval(tiny_frame, truth)
    # the truth through the default fusion is the oracle's ranking; through the product it is not
    assert m["ndcg10_fused"] == pytest.approx(1.0) == m["ndcg10_fused_truth"]
    assert m["ndcg10_random"] < m["ndcg10_product"] < 1.0
    product = ranking_eval(tiny_frame, truth, fusion=PRODUCT_FUSION)
    assert product["ndcg10_fused"] == m["ndcg10_product"]
    # another utility: the default ordering follows its weights
    other = {"click": 1.0, "watch_time": 1.0, "like": 1.0}
    assert ranking_eval(tiny_frame, truth, utility_weights=other)["ndcg10_fused"] == pytest.approx(
        1
    )
    # noisy predictions: the utility ordering of noisy values is below the oracle's
    rng = np.random.default_rng(0)
    noisy = {t: truth[t] * rng.lognormal(0.0, 0.5, len(tiny_frame)) for t in TASKS}
    assert m["ndcg10_random"] < ranking_eval(tiny_frame, noisy)["ndcg10_fused"] < 1.0
