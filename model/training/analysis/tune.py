"""``vidrank tune-fusion``: tune a version's fusion on held-out data and write the profile.

``run_tune_fusion(job)`` takes the test split (the last 10% by time, as in training) of the
impressions named by ``--data`` or ``--simulate``, scores it with the version's ONNX graph through
onnxruntime as the service would (``FrameRequests``), splits its users (seeded) into a search
part and a report part, searches the fusion on the search part
(model/training/analysis/fusion_search.py) and compares the tuned profile with the bundle's
default fusion and click-only ranking on both parts. It writes the profile with its tuning record
into the profile file (model/training/analysis/profiles.py) and the record as JSON with the
version, where ``vidrank report`` shows it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import optuna
import pandas as pd

from model.core.fileio import utc_now_iso
from model.core.fusion import FusionSpec
from model.core.registry import Registry, check_version_name
from model.training.analysis.fusion_search import (
    CLICK_ONLY,
    OBJECTIVE_KINDS,
    SEARCH_SPACE,
    Floor,
    Lists,
    Objective,
    Search,
    search,
    split_users,
)
from model.training.analysis.profiles import save_record, write_profile
from model.training.config import MIN_SIMULATED
from model.training.data import load_impressions, split_by_time
from model.training.export import predict_frame
from model.training.sources import simulated_impressions

PROFILE_NAME: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")


@dataclass(frozen=True)
class TuneJob:
    """One ``vidrank tune-fusion``, validated on construction (a bad option fails first)."""

    registry: Path
    version: str
    profiles: Path
    profile: str | None = None  # default: tuned_<version>
    data: Path | None = None
    simulate: int | None = None
    seed: int = 0  # the simulation's (with simulate), the user split's and the sampler's
    trials: int = 100
    objective: str = "auto"
    k: int = 10
    floor: Floor | None = None
    search_fraction: float = 0.5

    def __post_init__(self) -> None:
        if (self.data is None) == (self.simulate is None):
            raise ValueError("give exactly one of --data DIR or --simulate N")
        if self.simulate is not None and self.simulate < MIN_SIMULATED:
            raise ValueError(f"--simulate needs at least {MIN_SIMULATED} impressions")
        if self.trials < 1:
            raise ValueError(f"--trials must be >= 1, got {self.trials}")
        if self.objective not in ("auto", *OBJECTIVE_KINDS):
            raise ValueError(f"--objective must be auto, truth or logged, got {self.objective!r}")
        if self.k < 1:
            raise ValueError(f"--k must be >= 1, got {self.k}")
        if not 0.0 < self.search_fraction < 1.0:
            raise ValueError(f"--search-fraction must be in (0, 1), got {self.search_fraction}")
        check_version_name(self.version)
        if not PROFILE_NAME.fullmatch(self.profile_name):
            raise ValueError(f"--profile {self.profile_name!r}: use letters, digits, _ and -")

    @property
    def profile_name(self) -> str:
        return self.profile or f"tuned_{self.version}"

    @property
    def data_description(self) -> str:
        if self.simulate is not None:
            return f"simulated:{self.simulate} (seed {self.seed})"
        return str(self.data)


def heldout_frame(job: TuneJob) -> pd.DataFrame:
    """The test split (last 10% by time, as in training) of the job's impressions."""
    if job.simulate is not None:
        frame = simulated_impressions(job.simulate, job.seed)
    else:
        assert job.data is not None
        frame = load_impressions(job.data)
    return split_by_time(frame)[2]


def compare(parts: Mapping[str, Lists], specs: Mapping[str, FusionSpec]) -> dict[str, Any]:
    """The objective of every spec on every part: ``{spec name: {part name: value}}``."""
    return {
        name: {p: lists.ndcg(spec) for p, lists in parts.items()} for name, spec in specs.items()
    }


def floor_table(
    parts: Mapping[str, Lists], specs: Mapping[str, FusionSpec], floor: Floor
) -> dict[str, Any]:
    """Each spec's top-k mean of the floor's task, as a ratio to click-only's, per part."""
    base = {p: lists.top_mean(CLICK_ONLY, floor.task) for p, lists in parts.items()}
    return {
        name: {
            p: lists.top_mean(spec, floor.task) / base[p] if base[p] > 0 else math.nan
            for p, lists in parts.items()
        }
        for name, spec in specs.items()
    }


def run_tune_fusion(job: TuneJob) -> dict[str, Any]:
    """Tune, write the profile and the version's tuning record; returns the record."""
    registry = Registry(job.registry)
    bundle = registry.bundle(job.version)
    frame = heldout_frame(job)
    print(f"held-out: {len(frame):,} impressions of {job.data_description}; scoring {job.version}")
    objective = Objective.for_frame(frame, job.objective, k=job.k, floor=job.floor)
    preds = predict_frame(bundle.onnx_path, bundle.schema, frame)
    users = frame["user_id"].to_numpy()
    in_search = split_users(users, job.seed, job.search_fraction)
    parts = {
        part: Lists.of(frame[mask], {t: p[mask] for t, p in preds.items()}, objective)
        for part, mask in (("search", in_search), ("report", ~in_search))
    }
    for part, lists in parts.items():
        if not math.isfinite(lists.ndcg(CLICK_ONLY)):
            raise ValueError(
                f"the {part} part has no user with 2+ held-out impressions and some utility; "
                "give more data (or a larger --search-fraction for the search part)"
            )
    default = FusionSpec.from_dict(bundle.default_fusion)
    print(f"objective: {objective.describe()}; {job.trials} trials")
    found = search(parts["search"], default, job.trials, job.seed, job.floor)
    specs = {"tuned": found.spec, "default": default, "click_only": CLICK_ONLY}
    record = tuning_record(job, objective, found, parts, bundle.manifest)
    record["results"] = compare(parts, specs)
    if job.floor is not None:
        record["floor_ratio"] = floor_table(parts, specs, job.floor)
    record["profiles"] = {name: spec.to_dict() for name, spec in specs.items()}
    record = finite(record)
    write_profile(job.profiles, job.profile_name, found.spec, record)
    save_record(registry, job.version, job.profile_name, record)
    print(results_table(record))
    print(f"wrote profile {job.profile_name!r} to {job.profiles}")
    return record


def finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (JSON and TOML records)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def tuning_record(
    job: TuneJob,
    objective: Objective,
    found: Search,
    parts: Mapping[str, Lists],
    manifest: Mapping[str, Any],
) -> dict[str, Any]:
    """What the profile file and the registry keep about how a profile was found."""
    trained_on = manifest.get("training", {}).get("data")
    return {
        "version": job.version,
        "profile": job.profile_name,
        "created_at": utc_now_iso(),
        "objective": objective.to_record(),
        "value": found.value,
        "search_space": dict(SEARCH_SPACE),
        "sampler": f"optuna {optuna.__version__} TPESampler(seed={job.seed})",
        "trials": found.trials,
        "feasible_trials": found.feasible_trials,
        "default_was_first_trial": found.default_enqueued,
        "data": {
            "source": job.data_description,
            "version_trained_on": trained_on,
            "split": "test split (last 10% by time); users split by seed into search and report",
            **{f"{p}_users": lists.n_users for p, lists in parts.items()},
            **{f"{p}_impressions": int(len(lists.users)) for p, lists in parts.items()},
        },
    }


def results_table(record: Mapping[str, Any]) -> str:
    """Markdown table: tuned vs default vs click-only on the search and the report part."""
    lines = [
        f"objective: {record['objective']['description']}",
        "",
        "| fusion | search part | report part (unseen users) |",
        "|---|---|---|",
    ]
    for name, values in record["results"].items():
        cells = ("—" if values[p] is None else f"{values[p]:.4f}" for p in ("search", "report"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
