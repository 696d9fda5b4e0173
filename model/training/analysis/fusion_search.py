"""The fusion search of `vidrank tune-fusion`: objectives, search space and a seeded Optuna TPE.

:class:`Lists` holds one part of a version's held-out data (model/training/analysis/tune.py) as
per-user lists with the model's predictions; fusion goes through
``model.core.fusion.fuse_lists``, the service's code, so ``rank_sum`` ranks within each list as
it ranks within a request.

The search space (:data:`SEARCH_SPACE`): the method (weighted_sum, weighted_product,
rank_sum); the watch_time and like weights relative to click (every method ranks the same when
all weights are scaled by one factor, so click's weight is the unit); for the score-based
methods the watch_time transform (identity, log1p, scale with a searched scale); for rank_sum
its beta. The bundle's default is the first trial when it lies in the space, so the tuned
profile is at least as good as the default on the search part by construction.

Objectives (:class:`Objective`), NDCG@k over each user's held-out list (lists of one skipped):
``truth`` (simulated data) against the true expected utility ``simulate.true_utility``;
``logged`` (real logs) against the logged engagement of each impression, the same weights on the
observed click, watch seconds and like. An optional floor keeps one task's top-k mean (e.g. the
click rate in the top 10) at or above a fraction of what click-only ranking gets there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import optuna
import pandas as pd

from model.core.fusion import METHODS, FusionSpec, fuse_lists
from model.core.metrics import ndcg_at_k, topk_mean
from model.core.tasks import LABEL_COLUMNS, TASKS, TRUTH_COLUMNS
from model.simulator.world import DEFAULT_UTILITY_WEIGHTS
from model.training.evaluate import has_truth

WEIGHT_RANGE: Final = (1e-3, 1e3)  # watch_time and like weights relative to click (log scale)
SCALE_RANGE: Final = (1.0, 600.0)  # seconds per unit of the watch_time "scale" transform
BETA_RANGE: Final = (0.1, 100.0)  # rank_sum's beta
WATCH_TRANSFORMS: Final = ("identity", "log1p", "scale")
SEARCH_SPACE: Final[dict[str, str]] = {
    "method": f"categorical {list(METHODS)}",
    "click": "weight 1 (the unit: rankings do not change when all weights scale together)",
    "watch_time": f"weight log-uniform {list(WEIGHT_RANGE)}",
    "like": f"weight log-uniform {list(WEIGHT_RANGE)}",
    "watch_time_transform": f"categorical {list(WATCH_TRANSFORMS)} (score-based methods)",
    "watch_time_scale": f"log-uniform {list(SCALE_RANGE)} (transform scale)",
    "beta": f"log-uniform {list(BETA_RANGE)} (rank_sum)",
}
CLICK_ONLY: Final = FusionSpec.from_dict({"method": "weighted_sum", "weights": {"click": 1.0}})
OBJECTIVE_KINDS: Final = ("truth", "logged")


@dataclass(frozen=True)
class Floor:
    """Keep ``task``'s top-k mean at or above ``fraction`` of click-only ranking's."""

    task: str
    fraction: float

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"--floor: unknown task {self.task!r}; tasks are {TASKS}")
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"--floor: fraction must be in (0, 1], got {self.fraction}")

    @classmethod
    def parse(cls, text: str) -> Floor:
        """``"click=0.95"`` -> Floor("click", 0.95)."""
        task, sep, value = text.partition("=")
        try:
            fraction = float(value) if sep else math.nan
        except ValueError:
            fraction = math.nan
        if math.isnan(fraction):
            raise ValueError(f"--floor {text!r}: expected task=fraction, e.g. click=0.95")
        return cls(task.strip(), fraction)


@dataclass(frozen=True)
class Objective:
    """What the search maximises: NDCG@k of each user's list against a utility."""

    kind: str  # "truth" (true expected utility) or "logged" (observed engagement)
    k: int = 10
    utility_weights: Mapping[str, float] = field(
        default_factory=lambda: dict(DEFAULT_UTILITY_WEIGHTS)
    )
    floor: Floor | None = None

    def __post_init__(self) -> None:
        if self.kind not in OBJECTIVE_KINDS:
            raise ValueError(f"--objective must be one of {OBJECTIVE_KINDS}, got {self.kind!r}")
        if self.k < 1:
            raise ValueError(f"--k must be >= 1, got {self.k}")

    @classmethod
    def for_frame(cls, frame: pd.DataFrame, kind: str = "auto", **kwargs: Any) -> Objective:
        """``auto``: ``truth`` when the frame carries the simulator's truth, else ``logged``."""
        if kind == "auto":
            kind = "truth" if has_truth(frame) else "logged"
        elif kind == "truth" and not has_truth(frame):
            raise ValueError("--objective truth needs simulated data (truth columns)")
        return cls(kind, **kwargs)

    def relevance(self, frame: pd.DataFrame) -> np.ndarray:
        """Per impression: the weighted truth (``truth``) or the weighted labels (``logged``)."""
        columns = TRUTH_COLUMNS if self.kind == "truth" else LABEL_COLUMNS
        rel = np.zeros(len(frame), dtype=np.float64)
        for task, weight in self.utility_weights.items():
            rel += weight * frame[columns[task]].to_numpy(dtype=np.float64)
        return rel

    def describe(self) -> str:
        """One line for people: what is measured against what."""
        weights = ", ".join(f"{t} {w:g}" for t, w in self.utility_weights.items())
        against = "true expected utility" if self.kind == "truth" else "logged engagement"
        text = f"NDCG@{self.k} per user vs {against} ({weights}; watch_time per second)"
        if self.floor is not None:
            text += (
                f"; floor: top-{self.k} {self.floor.task} mean >= {self.floor.fraction:g} x "
                "click-only ranking's"
            )
        return text

    def to_record(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.kind,
            "k": self.k,
            "utility_weights": dict(self.utility_weights),
            "description": self.describe(),
        }
        if self.floor is not None:
            out["floor"] = {"task": self.floor.task, "fraction": self.floor.fraction}
        return out


@dataclass
class Lists:
    """One part of the held-out data as per-user lists, ready to score fusions quickly."""

    preds: dict[str, np.ndarray]  # {task: float64 per row}
    users: np.ndarray
    relevance: np.ndarray
    labels: dict[str, np.ndarray]  # for the floor: observed label per task
    k: int

    @classmethod
    def of(
        cls, frame: pd.DataFrame, preds: Mapping[str, np.ndarray], objective: Objective
    ) -> Lists:
        """The rows of users with at least two impressions (a list of one has no order)."""
        users = frame["user_id"].to_numpy()
        _, inverse, counts = np.unique(users, return_inverse=True, return_counts=True)
        keep = counts[inverse.reshape(-1)] >= 2
        kept = frame[keep]
        return cls(
            preds={t: np.asarray(preds[t], dtype=np.float64)[keep] for t in TASKS},
            users=users[keep],
            relevance=objective.relevance(kept),
            labels={t: kept[c].to_numpy(dtype=np.float64) for t, c in LABEL_COLUMNS.items()},
            k=objective.k,
        )

    @property
    def n_users(self) -> int:
        return int(len(np.unique(self.users)))

    def scores(self, spec: FusionSpec) -> np.ndarray:
        """Every row's fused score under ``spec`` (the service's fusion, per user list)."""
        return fuse_lists(spec, self.preds, self.users)

    def ndcg(self, spec: FusionSpec) -> float:
        return ndcg_at_k(self.relevance, self.scores(spec), self.users, self.k)

    def top_mean(self, spec: FusionSpec, task: str) -> float:
        """``task``'s observed label averaged over each list's top k under ``spec``."""
        return topk_mean(self.labels[task], self.scores(spec), self.users, self.k)


def split_users(users: np.ndarray, seed: int, search_fraction: float = 0.5) -> np.ndarray:
    """Boolean mask of the rows whose user is in the search part (seeded, by user)."""
    if not 0.0 < search_fraction < 1.0:
        raise ValueError(f"--search-fraction must be in (0, 1), got {search_fraction}")
    unique = np.unique(users)
    rng = np.random.default_rng(seed)
    chosen = rng.permutation(len(unique))[: max(1, round(search_fraction * len(unique)))]
    return np.isin(users, unique[chosen])


# -- the search space ---------------------------------------------------------------------------


def suggest_spec(trial: optuna.Trial | optuna.trial.FixedTrial) -> FusionSpec:
    """One point of :data:`SEARCH_SPACE` (define-by-run: parameters depend on the method)."""
    method = trial.suggest_categorical("method", list(METHODS))
    watch = trial.suggest_float("watch_time", *WEIGHT_RANGE, log=True)
    like = trial.suggest_float("like", *WEIGHT_RANGE, log=True)
    watch_term: float | dict[str, Any] = watch
    extra: dict[str, Any] = {}
    if method == "rank_sum":  # ranks ignore transforms
        extra["beta"] = trial.suggest_float("beta", *BETA_RANGE, log=True)
    else:
        transform = trial.suggest_categorical("watch_time_transform", list(WATCH_TRANSFORMS))
        if transform == "scale":
            scale = trial.suggest_float("watch_time_scale", *SCALE_RANGE, log=True)
            watch_term = {"weight": watch, "transform": "scale", "scale": scale}
        elif transform == "log1p":
            watch_term = {"weight": watch, "transform": "log1p"}
    weights = {"click": 1.0, "watch_time": watch_term, "like": like}
    return FusionSpec.from_dict({"method": method, "weights": weights, **extra})


def _in_range(value: float, bounds: tuple[float, float]) -> bool:
    return bounds[0] <= value <= bounds[1]


def space_params(spec: FusionSpec) -> dict[str, Any] | None:
    """The trial parameters that reproduce ``spec``'s ranking, or None when it is outside the space.

    Weights are divided by click's (rankings are scale-invariant); click and like must use the
    identity transform, and a weighted_product spec the default epsilon.
    """
    click = spec.terms.get("click")
    if click is None or click.weight <= 0 or click.transform != "identity":
        return None
    watch, like = spec.terms.get("watch_time"), spec.terms.get("like")
    if watch is None or like is None or like.transform != "identity":
        return None
    params: dict[str, Any] = {
        "method": spec.method,
        "watch_time": watch.weight / click.weight,
        "like": like.weight / click.weight,
    }
    if spec.method == "rank_sum":
        params["beta"] = spec.beta
    else:
        if spec.method == "weighted_product" and spec.epsilon != 1e-6:
            return None
        params["watch_time_transform"] = watch.transform
        if watch.transform == "scale":
            params["watch_time_scale"] = watch.scale
    ranges = {
        "watch_time": WEIGHT_RANGE,
        "like": WEIGHT_RANGE,
        "beta": BETA_RANGE,
        "watch_time_scale": SCALE_RANGE,
    }
    ok = all(_in_range(params[k], r) for k, r in ranges.items() if k in params)
    return params if ok else None


# -- the search ---------------------------------------------------------------------------------


@dataclass
class Search:
    """The outcome of :func:`search`."""

    spec: FusionSpec
    value: float  # the objective on the search part
    trials: int
    feasible_trials: int
    default_enqueued: bool


def _trial_objective(
    lists: Lists, floor: Floor | None, click_only_floor: float
) -> Callable[[optuna.Trial], float]:
    def run(trial: optuna.Trial) -> float:
        spec = suggest_spec(trial)
        if floor is not None:
            ratio = lists.top_mean(spec, floor.task) / click_only_floor
            trial.set_user_attr("floor_ratio", ratio)
            # feasible when <= 0: the sampler steers towards it, best_trial only counts it
            trial.set_constraint("floor", floor.fraction - ratio)
        value = lists.ndcg(spec)
        return value if math.isfinite(value) else -math.inf

    return run


def search(
    lists: Lists,
    default: FusionSpec,
    trials: int,
    seed: int,
    floor: Floor | None = None,
) -> Search:
    """Maximise the objective over :data:`SEARCH_SPACE` with a seeded TPE sampler.

    The first trial is ``default`` when :func:`space_params` can express it. With a floor, a
    trial is feasible only when it meets it (``Trial.set_constraint``: the sampler models it and
    ``best_trial`` only counts feasible trials). Ties go to the earliest trial.
    """
    if trials < 1:
        raise ValueError(f"--trials must be >= 1, got {trials}")
    click_only_floor = lists.top_mean(CLICK_ONLY, floor.task) if floor is not None else 1.0
    if floor is not None and not click_only_floor > 0:
        raise ValueError(f"--floor {floor.task}: click-only ranking has no {floor.task} in top k")
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial is noise here
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    params = space_params(default)
    if params is not None:
        study.enqueue_trial(params)
    study.optimize(_trial_objective(lists, floor, click_only_floor), n_trials=trials)
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    feasible = [t for t in done if floor is None or t.user_attrs["floor_ratio"] >= floor.fraction]
    if not feasible:
        raise RuntimeError(f"no trial met the floor {floor}; try more --trials or a lower floor")
    best = study.best_trial
    assert best.value is not None  # a completed single-objective trial has its value
    spec = suggest_spec(optuna.trial.FixedTrial(best.params))
    return Search(spec, best.value, len(done), len(feasible), params is not None)
