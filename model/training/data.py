"""Load impression logs in KuaiRand's schema (CSV or Parquet) into the trainer's frame.

`load_impressions(dir)` joins the log(s) with user and basic video features and returns one row per
impression, sorted by time_ms, with the default feature schema's column names, the labels
`click`, `watch_s`, `like`, `time_ms`, and the simulator's truth columns when present (see
docs/internals.md). It works for the real KuaiRand files and for
`model.simulator.world` output alike.

Choices worth knowing:
- watch_s = play_time_ms / 1000 for clicked impressions, clipped to [0, max_watch_ratio x duration]
  (default 1.0: replays are not counted, which keeps KuaiRand's multi-hour loops from dominating a
  regression loss); 0 when not clicked.
- hour comes from hourmin (HHMM, local time); when absent, from time_ms in Beijing time (UTC+8),
  the timezone of KuaiRand's date/hourmin columns. day_of_week (Monday = 0) from date likewise.
- Missing optional columns take defaults: "UNKNOWN" activity, "NORMAL" type, "" tag, 0 counts,
  -1 for unknown author/music ids (a bucket of its own), 0 upload age, 0 tab.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from model.core.features import default_schema
from model.core.tasks import TRUTH_COLUMNS

BEIJING_OFFSET_MS = 8 * 3600 * 1000
# The default schema's features, in its order: the loader emits exactly these columns.
FEATURE_COLUMNS = tuple(default_schema().names())
LOG_COLUMNS = (
    "user_id",
    "video_id",
    "date",
    "hourmin",
    "time_ms",
    "is_click",
    "is_like",
    "play_time_ms",
    "duration_ms",
    "tab",
    *TRUTH_COLUMNS.values(),
)
USER_COLUMNS = tuple(default_schema().names("user"))  # read from user_features*
VIDEO_COLUMNS = (
    "video_id",
    "author_id",
    "video_type",
    "upload_dt",
    "video_duration",
    "music_id",
    "tag",
)
# Read as text so that "12,65" stays a string and a lone "12" does not become 12.0 next to NaNs.
TEXT_COLUMNS = ("tag", "user_active_degree", "video_type", "upload_dt")
DATA_SUFFIXES = (".parquet", ".csv")
SHARD_RE = re.compile(r"^part-(\d{5})-of-(\d{5})\.parquet$")


# -- finding and reading files ---------------------------------------------------------------
def _find(data_dir: Path, prefix: str) -> list[Path]:
    """Files named prefix*.csv|parquet, sorted; Parquet wins when both formats of a stem exist."""
    by_stem: dict[str, Path] = {}
    for suffix in reversed(DATA_SUFFIXES):  # Parquet last, so it overwrites a CSV twin
        for path in sorted(data_dir.glob(f"{prefix}*{suffix}")):
            by_stem[path.stem] = path
    return sorted(by_stem.values(), key=lambda p: p.name)


def _find_one(data_dir: Path, prefix: str) -> Path:
    found = _find(data_dir, prefix)
    if not found:
        raise ValueError(f"no {prefix}*.csv or {prefix}*.parquet file in {data_dir}")
    if len(found) > 1:
        raise ValueError(f"several {prefix}* files in {data_dir}: {[p.name for p in found]}")
    return found[0]


def _read_table(path: Path, wanted: Iterable[str], max_rows: int | None = None) -> pd.DataFrame:
    """Read the wanted columns that exist in a CSV or Parquet file (at most max_rows rows)."""
    wanted = set(wanted)
    if path.suffix == ".csv":
        dtype = {c: "string" for c in TEXT_COLUMNS if c in wanted}
        frame = pd.read_csv(path, usecols=lambda c: c in wanted, dtype=dtype, nrows=max_rows)
    else:
        columns = [c for c in pq.read_schema(path).names if c in wanted]
        frame = _read_parquet_head(path, columns, max_rows)
    for col in TEXT_COLUMNS:
        if col in frame.columns:
            frame[col] = _as_text(frame[col])
    return frame


def _read_parquet_head(path: Path, columns: list[str], max_rows: int | None) -> pd.DataFrame:
    if max_rows is None:
        return pd.read_parquet(path, columns=columns)
    batches, rows = [], 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=65_536, columns=columns):
        batches.append(batch.to_pandas())
        rows += batch.num_rows
        if rows >= max_rows:
            break
    if not batches:
        return pd.read_parquet(path, columns=columns)
    return pd.concat(batches, ignore_index=True).iloc[:max_rows]


def _as_text(col: pd.Series) -> pd.Series:
    """Object column of stripped strings; whole floats (12.0) print as integers, NaN as None."""
    if pd.api.types.is_float_dtype(col):
        whole = col.notna() & (col == np.round(col))
        col = col.astype(object).where(~whole, col[whole].astype("int64").astype(str))
    text = col.astype(object).where(col.notna(), None)
    return text.map(lambda v: None if v is None else str(v).strip())


def _require(frame: pd.DataFrame, columns: Iterable[str], path: Path) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{path.name} lacks required column(s) {missing}")


def log_paths(data_dir: Path) -> list[Path]:
    """The log files, in the order their rows count: standard logs then random-exposure logs,
    each set in name order. Raises ValueError when there is none."""
    paths = _find(data_dir, "log_standard") + _find(data_dir, "log_random")
    if not paths:
        raise ValueError(f"no log_standard*/log_random* .csv or .parquet file in {data_dir}")
    return paths


def check_log(frame: pd.DataFrame, path: Path) -> None:
    """The columns every log file needs (ValueError naming the file and the column)."""
    _require(frame, ("user_id", "video_id", "is_click"), path)
    if "time_ms" not in frame.columns and "date" not in frame.columns:
        raise ValueError(f"{path.name} lacks a time column: needs time_ms or date")


def _read_logs(data_dir: Path, max_rows: int | None) -> pd.DataFrame:
    """The logs (``log_paths``' order), up to max_rows rows."""
    frames, remaining = [], max_rows
    for path in log_paths(data_dir):
        if remaining is not None and remaining <= 0:
            break
        frame = _read_table(path, LOG_COLUMNS, remaining)
        check_log(frame, path)
        frames.append(frame)
        remaining = None if remaining is None else remaining - len(frame)
    return pd.concat(frames, ignore_index=True)


# -- deriving the schema columns -------------------------------------------------------------
def _int_col(frame: pd.DataFrame, name: str, default: int) -> np.ndarray:
    if name not in frame.columns:
        return np.full(len(frame), default, dtype=np.int64)
    return np.asarray(frame[name].fillna(default).to_numpy(), dtype=np.int64)


def _float_col(frame: pd.DataFrame, name: str, default: float) -> np.ndarray:
    if name not in frame.columns:
        return np.full(len(frame), default, dtype=np.float64)
    return np.asarray(frame[name].fillna(default).to_numpy(), dtype=np.float64)


def _text_col(frame: pd.DataFrame, name: str, default: str) -> np.ndarray:
    if name not in frame.columns:
        return np.full(len(frame), default, dtype=object)
    col = frame[name].astype(object)
    return np.asarray(col.where(col.notna() & (col != ""), default).to_numpy(), dtype=object)


def _parse_days(values: pd.Series, fmt: str | None) -> np.ndarray:
    """datetime64[D] per value (NaT when unparsable); each distinct value is parsed once."""
    uniq, inverse = np.unique(values.astype(str).to_numpy(), return_inverse=True)
    parsed = pd.to_datetime(pd.Series(uniq), format=fmt, errors="coerce").to_numpy()
    return np.asarray(parsed.astype("datetime64[D]")[inverse.reshape(-1)])


def impression_times(log: pd.DataFrame) -> np.ndarray:
    """time_ms (UTC epoch ms) of each log row, from time_ms or from date and hourmin."""
    return _time_columns(log)[0]


def _time_columns(log: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """time_ms (UTC epoch ms), local impression day (datetime64[D]) and local hour."""
    day: np.ndarray | None = None
    if "date" in log.columns and log["date"].notna().all():
        day = _parse_days(log["date"].astype("int64"), "%Y%m%d")
        if np.isnat(day).any():
            raise ValueError("log column date must hold YYYYMMDD dates")
    hourmin = None
    if "hourmin" in log.columns and log["hourmin"].notna().all():
        hourmin = log["hourmin"].to_numpy(dtype=np.int64)
    if "time_ms" in log.columns and log["time_ms"].notna().all():
        time_ms = log["time_ms"].to_numpy(dtype=np.int64)
    elif day is not None:
        minutes = np.zeros(len(log), np.int64) if hourmin is None else _minutes(hourmin)
        local_ms = day.astype("datetime64[ms]").astype(np.int64) + minutes * 60_000
        time_ms = local_ms - BEIJING_OFFSET_MS
    else:
        raise ValueError("log rows lack both time_ms and date")
    local = (time_ms + BEIJING_OFFSET_MS).astype("datetime64[ms]")
    if day is None:
        day = local.astype("datetime64[D]")
    if hourmin is not None:
        hour = hourmin // 100
    else:
        hour = (local - local.astype("datetime64[D]")).astype(np.int64) // 3_600_000
    return time_ms, day, hour.astype(np.int64)


def _minutes(hourmin: np.ndarray) -> np.ndarray:
    return (hourmin // 100) * 60 + hourmin % 100


def _day_of_week(day: np.ndarray) -> np.ndarray:
    # 1970-01-01 was a Thursday (Monday = 0 -> Thursday = 3).
    return ((day.astype(np.int64) + 3) % 7).astype(np.int64)


def _upload_age_days(joined: pd.DataFrame, day: np.ndarray) -> np.ndarray:
    """Whole days from upload to impression, >= 0; 0 when the upload date is unknown."""
    age = np.zeros(len(day), dtype=np.float64)
    if "upload_day" not in joined.columns:
        return age
    upload = joined["upload_day"].to_numpy().astype("datetime64[D]")
    known = ~np.isnat(upload)
    age[known] = (day[known] - upload[known]).astype(np.int64)
    return np.maximum(age, 0.0)


def _join(log: pd.DataFrame, table: pd.DataFrame, key: str) -> pd.DataFrame:
    """Left-join a per-entity table (its keys unique: ``EntityTables``); unknown keys get NaN."""
    table = table.drop(columns=[c for c in table.columns if c != key and c in log.columns])
    return log.merge(table, on=key, how="left", sort=False)


def _watch_seconds(
    joined: pd.DataFrame, click: np.ndarray, duration_s: np.ndarray, max_watch_ratio: float | None
) -> np.ndarray:
    watch = np.maximum(_float_col(joined, "play_time_ms", 0.0) / 1000.0, 0.0)
    if max_watch_ratio is not None:
        cap = np.where(duration_s > 0, max_watch_ratio * duration_s, np.inf)
        watch = np.minimum(watch, cap)
    return np.where(click == 1, watch, 0.0).astype(np.float32)


def user_feature_columns(frame: pd.DataFrame) -> dict[str, np.ndarray]:
    """The default schema's user features from user_features* columns (joined to a log or not).

    Missing columns and values take the loader's defaults; the feature store publishes exactly
    these values, so training and serving read a user the same way.
    """
    return {
        "user_id": _int_col(frame, "user_id", -1),
        "user_active_degree": _text_col(frame, "user_active_degree", "UNKNOWN"),
        "is_video_author": _int_col(frame, "is_video_author", 0),
        "follow_user_num": _float_col(frame, "follow_user_num", 0.0).astype(np.float32),
        "fans_user_num": _float_col(frame, "fans_user_num", 0.0).astype(np.float32),
        "register_days": _float_col(frame, "register_days", 0.0).astype(np.float32),
    }


def video_feature_columns(
    frame: pd.DataFrame, duration_s: np.ndarray, upload_age_days: np.ndarray
) -> dict[str, np.ndarray]:
    """The default schema's item features from video_features_basic* columns.

    ``duration_s`` and ``upload_age_days`` are derived by the caller: per impression in training
    (the log's duration, the impression day), per video in the feature store (the table's
    duration, the snapshot's as-of day).
    """
    return {
        "video_id": _int_col(frame, "video_id", -1),
        "author_id": _int_col(frame, "author_id", -1),
        "video_type": _text_col(frame, "video_type", "NORMAL"),
        "music_id": _int_col(frame, "music_id", -1),
        "tag": _text_col(frame, "tag", ""),
        "duration_s": duration_s.astype(np.float32),
        "upload_age_days": upload_age_days.astype(np.float32),
    }


def _build_frame(joined: pd.DataFrame, max_watch_ratio: float | None) -> pd.DataFrame:
    time_ms, day, hour = _time_columns(joined)
    # The log's per-impression duration wins; the video table's fills the gaps.
    duration_ms = _float_col(joined, "duration_ms", np.nan)
    duration_ms = np.where(
        np.isnan(duration_ms), _float_col(joined, "video_duration", 0.0), duration_ms
    )
    duration_s = duration_ms / 1000.0
    click = np.clip(_int_col(joined, "is_click", 0), 0, 1).astype(np.int8)
    out = pd.DataFrame(
        {
            **user_feature_columns(joined),
            "hour": hour,
            "day_of_week": _day_of_week(day),
            "tab": _int_col(joined, "tab", 0),
            **video_feature_columns(joined, duration_s, _upload_age_days(joined, day)),
            "click": click,
            "watch_s": _watch_seconds(joined, click, duration_s, max_watch_ratio),
            "like": np.clip(_int_col(joined, "is_like", 0), 0, 1).astype(np.int8),
            "time_ms": time_ms,
        }
    )
    for col in TRUTH_COLUMNS.values():
        if col in joined.columns:
            out[col] = joined[col].to_numpy(dtype=np.float32)
    return out


def read_entity_tables(data_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Path]]:
    """(users, videos, {"user": path, "item": path}): the user_features* and
    video_features_basic* tables of ``data_dir`` (CSV or Parquet), with ``upload_day`` parsed."""
    user_path = _find_one(data_dir, "user_features")
    video_path = _find_one(data_dir, "video_features_basic")
    users = _read_table(user_path, USER_COLUMNS)
    _require(users, ("user_id",), user_path)
    videos = _read_table(video_path, VIDEO_COLUMNS)
    _require(videos, ("video_id",), video_path)
    if "upload_dt" in videos.columns:  # parse per video, not per impression
        videos["upload_day"] = _parse_days(videos.pop("upload_dt"), None)
    return users, videos, {"user": user_path, "item": video_path}


def last_log_day(data_dir: Path) -> np.datetime64 | None:
    """The local (Beijing) day of the latest impression in the logs, None without logs."""
    paths = _find(data_dir, "log_standard") + _find(data_dir, "log_random")
    days = []
    for path in paths:
        frame = _read_table(path, ("date", "time_ms"))
        if "date" in frame.columns and frame["date"].notna().all() and len(frame):
            days.append(_parse_days(pd.Series([int(frame["date"].max())]), "%Y%m%d")[0])
        elif "time_ms" in frame.columns and len(frame):
            local = np.int64(frame["time_ms"].max()) + BEIJING_OFFSET_MS
            days.append(np.datetime64(int(local), "ms").astype("datetime64[D]"))
    return max(days) if days else None


def load_impressions(
    data_dir: Path, max_rows: int | None = None, max_watch_ratio: float | None = 1.0
) -> pd.DataFrame:
    """Join logs with user and video features into the trainer's impression frame.

    data_dir holds log_standard*/log_random*, user_features* and video_features_basic* files as
    CSV or Parquet. max_rows caps the rows read from the logs (standard logs first, in file-name
    order) before sorting by time. watch_s is capped at max_watch_ratio x duration (None: no
    cap). Raises ValueError naming a missing file or required column.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise ValueError(f"data directory {data_dir} does not exist")
    if max_rows is not None and max_rows < 1:
        raise ValueError("max_rows must be >= 1")
    log = _read_logs(data_dir, max_rows)
    frame = impression_frame(log, EntityTables.read(data_dir), max_watch_ratio)
    order = np.argsort(frame["time_ms"].to_numpy(), kind="stable")
    return frame.iloc[order].reset_index(drop=True)


@dataclass(frozen=True)
class EntityTables:
    """The per-user and per-video tables that log rows are joined with (read once, checked)."""

    users: pd.DataFrame
    videos: pd.DataFrame
    paths: dict[str, Path]

    @classmethod
    def read(cls, data_dir: Path) -> EntityTables:
        users, videos, paths = read_entity_tables(data_dir)
        for table, key, entity in ((users, "user_id", "user"), (videos, "video_id", "item")):
            if table[key].duplicated().any():
                raise ValueError(f"{paths[entity].name} has duplicate {key} values")
        return cls(users, videos, paths)


def impression_frame(
    log: pd.DataFrame, tables: EntityTables, max_watch_ratio: float | None = 1.0
) -> pd.DataFrame:
    """Log rows joined with their user and video and derived into the trainer's columns, in the
    log's row order (``load_impressions`` for a whole log, the streaming reader per chunk)."""
    joined = _join(log, tables.users, "user_id")
    return _build_frame(_join(joined, tables.videos, "video_id"), max_watch_ratio)


# -- splitting and sharding ------------------------------------------------------------------
def split_ends(n: int, valid_fraction: float = 0.1, test_fraction: float = 0.1) -> tuple[int, int]:
    """(train end, valid end): where the valid and the test rows start among n time-ordered
    rows (``split_by_time``; the streaming reader places its boundaries at the same rows)."""
    if valid_fraction < 0 or test_fraction < 0 or valid_fraction + test_fraction >= 1:
        raise ValueError("fractions must be >= 0 and sum to less than 1")
    n_test = int(round(n * test_fraction))
    n_valid = int(round(n * valid_fraction))
    return n - n_test - n_valid, n - n_test


def split_by_time(
    df: pd.DataFrame, valid_fraction: float = 0.1, test_fraction: float = 0.1
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Chronological train/valid/test split by row count: the last rows are test.

    Every train row is no later than every valid row, and valid no later than test.
    """
    ordered = df.iloc[np.argsort(df["time_ms"].to_numpy(), kind="stable")]
    train_end, valid_end = split_ends(len(ordered), valid_fraction, test_fraction)
    return (
        ordered.iloc[:train_end].reset_index(drop=True),
        ordered.iloc[train_end:valid_end].reset_index(drop=True),
        ordered.iloc[valid_end:].reset_index(drop=True),
    )


def _shard_name(index: int, n_shards: int) -> str:
    return f"part-{index:05d}-of-{n_shards:05d}.parquet"


def write_shards(df: pd.DataFrame, out_dir: Path, n_shards: int) -> list[Path]:
    """Write df as n_shards Parquet files, row i to shard i mod n_shards.

    Round-robin keeps shard sizes within one row of each other (DDP ranks then run the same
    number of steps) and gives every shard the whole time range. Stale shards from an earlier
    write in out_dir are removed; each file is written under a temporary name and renamed.
    """
    if n_shards < 1:
        raise ValueError("n_shards must be >= 1")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.iterdir():
        if SHARD_RE.match(stale.name):
            stale.unlink()
    assignment = np.arange(len(df)) % n_shards
    paths = []
    for index in range(n_shards):
        path = out_dir / _shard_name(index, n_shards)
        tmp = out_dir / f".{path.name}.tmp"
        df.iloc[np.flatnonzero(assignment == index)].to_parquet(tmp, index=False)
        tmp.replace(path)
        paths.append(path)
    return paths


def list_shards(shard_dir: Path) -> list[Path]:
    """The complete, consistent set of shard files in shard_dir, in shard order."""
    found = sorted(p for p in Path(shard_dir).iterdir() if SHARD_RE.match(p.name))
    if not found:
        raise ValueError(f"no part-*-of-*.parquet shards in {shard_dir}")
    first = SHARD_RE.match(found[0].name)
    total = int(first.group(2)) if first else 0
    expected = [_shard_name(i, total) for i in range(total)]
    if [p.name for p in found] != expected:
        raise ValueError(f"incomplete or mixed shards in {shard_dir}: expected {total} of them")
    return found


def read_shard(shard_dir: Path, rank: int, world: int) -> pd.DataFrame:
    """Rows of the shards belonging to `rank` of `world` (shards rank, rank + world, ...).

    Needs at least as many shards as ranks; the result is sorted by time_ms.
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"invalid rank {rank} for world size {world}")
    shards = list_shards(Path(shard_dir))
    if len(shards) < world:
        raise ValueError(f"{len(shards)} shard(s) cannot feed {world} ranks")
    frame = pd.concat([pd.read_parquet(p) for p in shards[rank::world]], ignore_index=True)
    order = np.argsort(frame["time_ms"].to_numpy(), kind="stable")
    return frame.iloc[order].reset_index(drop=True)
