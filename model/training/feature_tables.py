"""The feature store's tables, read from the same KuaiRand-schema files training reads.

``vidrank features publish --data DIR`` turns ``user_features*`` and ``video_features_basic*``
(CSV or Parquet; the simulator writes the same) into one row per user and per video, with the
values ``model.training.data`` derives for training - the same columns, defaults and types, by
the same functions - so a stored row encodes exactly as a logged impression of that user/video.

Point-in-time: KuaiRand's and the simulator's user and video tables are static (one row per id,
no validity interval), so training joins each impression with the only row there is and the
store serves that row. The one time-dependent feature, ``upload_age_days``, is derived: per
impression in training (impression day - upload day), and per snapshot here, as of ``as_of``
(default: the last day in the logs beside the tables, else today, UTC). A backend that needs the
exact age sends it in the request, where it overrides the stored value.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
from tqdm import tqdm

from model.core.store.snapshot import EntityTable, Progress, build_tables
from model.training.data import (
    last_log_day,
    read_entity_tables,
    user_feature_columns,
    video_feature_columns,
)


def resolve_as_of(data_dir: Path, as_of: str | None) -> tuple[np.datetime64, str]:
    """(day, where it came from): ``as_of`` (YYYY-MM-DD), else the logs' last day, else today."""
    if as_of is not None:
        try:
            return np.datetime64(dt.date.fromisoformat(as_of), "D"), "given"
        except ValueError:
            raise ValueError(f"--as-of must be a date YYYY-MM-DD, not {as_of!r}") from None
    last = last_log_day(data_dir)
    if last is not None:
        return last, "last log day"
    return np.datetime64(dt.datetime.now(dt.UTC).date(), "D"), "today (UTC)"


def feature_columns(
    data_dir: Path, as_of: str | None = None
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, Any]]:
    """({"user": columns, "item": columns}, source description) for a snapshot of ``data_dir``."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise ValueError(f"data directory {data_dir} does not exist")
    users, videos, paths = read_entity_tables(data_dir)
    day, day_source = resolve_as_of(data_dir, as_of)
    columns = {
        "user": user_feature_columns(users),
        "item": video_feature_columns(videos, _duration_s(videos), _upload_age(videos, day)),
    }
    source = {
        "data": str(data_dir.resolve()),
        "files": {entity: path.name for entity, path in paths.items()},
        "as_of": str(day),
        "as_of_source": day_source,
    }
    return columns, source


def _duration_s(videos: pd.DataFrame) -> np.ndarray:
    if "video_duration" not in videos.columns:
        return np.zeros(len(videos))
    return np.asarray(videos["video_duration"].fillna(0.0).to_numpy(dtype=np.float64)) / 1000.0


def _upload_age(videos: pd.DataFrame, day: np.datetime64) -> np.ndarray:
    """Whole days from upload to ``day``, >= 0; 0 when the upload date is unknown (as training)."""
    age = np.zeros(len(videos), dtype=np.float64)
    if "upload_day" not in videos.columns:
        return age
    upload = videos["upload_day"].to_numpy().astype("datetime64[D]")
    known = ~np.isnat(upload)
    age[known] = (day - upload[known]).astype(np.int64)
    return np.maximum(age, 0.0)


class Target(Protocol):
    """Where a snapshot goes: ``SnapshotStore`` (embedded) or ``RedisSnapshots``."""

    def publish(
        self,
        tables: Mapping[str, EntityTable],
        name: str,
        source: Mapping[str, Any],
        progress: Progress | None = None,
    ) -> Any: ...


def default_snapshot_name() -> str:
    """``s`` + the UTC time, like model versions' ``v`` + time."""
    return "s" + dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")


def publish_features(
    data_dir: Path, target: Target, name: str, as_of: str | None = None, show_progress: bool = True
) -> dict[str, Any]:
    """Read the tables of ``data_dir``, validate them and publish snapshot ``name`` to ``target``.

    Returns a summary (rows per entity, columns, source). A progress bar shows the write steps
    (one per file for the embedded store, per 10k rows for Redis).
    """
    columns, source = feature_columns(data_dir, as_of)
    tables = build_tables(columns)
    with tqdm(desc=f"publishing {name}", unit="step", disable=not show_progress) as bar:

        def progress(step: str) -> None:
            bar.set_postfix_str(step, refresh=False)
            bar.update(1)

        target.publish(tables, name, source, progress)
    return {
        "snapshot": name,
        "rows": {e: t.rows for e, t in tables.items()},
        "columns": {e: list(t.feature_columns) for e, t in tables.items()},
        "source": source,
    }
