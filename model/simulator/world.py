"""Video-interaction simulator with ground truth, written in KuaiRand's schema.

Users and videos carry latent vectors for four components: one *shared* driver and one driver per
task (click, completion, like). A task's affinity mixes the shared and its own driver as
sqrt(|rho|) * s_k * shared + sqrt(1 - |rho|) * own, where rho = ``task_correlation`` and s_k = +1
for click and sign(rho) for completion and like: rho in [0, 1] is the correlation of the three
drivers (1.0 = one driver), as in the MMoE paper's synthetic study; rho < 0 makes click
*conflict* with completion and like (correlation rho), which stay correlated |rho| with each other.

The knobs that give multi-gate models something to choose between (``SimConfig``, and the named
``PRESETS`` the experiment sweeps; docs/internals.md has the table):

- ``task_fields``: the item field whose latent vector meets the user's in each task's *own*
  driver - the video itself (default), its tags, its author, its music or its duration (a smooth
  per-user preference curve over log duration). Different fields per task = tasks driven by
  different inputs.
- ``nonlinearity``: amplitude a of a task-specific response z + a * sum_i sin(alpha_ki z + beta_ki)
  of each task's affinity z (Ma et al., KDD 2018, build their synthetic tasks from sin terms);
  alpha and beta are drawn per task, so equal drivers still get different responses.

Everything the truth depends on is visible to a ranking model: user/video/author/music ids
(latent affinities and biases), tags (video vectors are partly built from tag vectors), hour, tab,
duration, upload age, video type and the user features. Clickbait videos get a click boost and a
completion and like penalty, so ranking by p_click alone is measurably worse than ranking by a
fused utility. Labels are sampled from the truth; the truth columns hold the exact expectations.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd

Floats = npt.NDArray[np.float64]
Ints = npt.NDArray[np.int64]
Bools = npt.NDArray[np.bool_]

TASKS = ("click", "complete", "like")
N_TABS = 15
MAX_TAGS = 3
BEIJING_OFFSET_S = 8 * 3600  # KuaiRand's date/hourmin are local (UTC+8); time_ms is UTC epoch
ACTIVE_DEGREES = ("high_active", "full_active", "middle_active", "UNKNOWN")

# Effect sizes on the logit scale. Chosen so the default config lands near KuaiRand's rates
# (CTR about a third, likes about 1-2% of impressions) with every effect clearly learnable.
CLICKBAIT_CLICK, CLICKBAIT_COMPLETE, CLICKBAIT_LIKE = 1.2, -2.0, -2.5
AD_CLICK, AD_COMPLETE, AD_LIKE = -0.4, -0.3, -1.5
FRESH_CLICK, FRESH_DAYS = 0.6, 3.0  # click boost decaying with upload age
DURATION_COMPLETE, DURATION_CLICK, MEDIAN_DURATION_S = -0.7, -0.1, 25.0
BIAS = {"click": -1.4, "complete": -0.2, "like": -3.7}
AFFINITY_SCALE = {"click": 1.0, "complete": 1.0, "like": 1.2}
DEGREE_CLICK = {"high_active": 0.2, "full_active": 0.1, "middle_active": -0.1, "UNKNOWN": -0.3}
HOUR_PEAK = {"click": 20.0, "complete": 23.0, "like": 21.0}  # hour of day where the effect peaks
HOUR_AMPLITUDE = {"click": 0.3, "complete": 0.2, "like": 0.15}
BIAS_VECTOR = np.asarray([BIAS[t] for t in TASKS])
AFFINITY_VECTOR = np.asarray([AFFINITY_SCALE[t] for t in TASKS])
WATCH_CONCENTRATION = 3.0  # Beta(k*c, k*(1-c)) spread of the watched fraction around its mean c

DEFAULT_UTILITY_WEIGHTS: dict[str, float] = {"click": 1.0, "watch_time": 0.1, "like": 20.0}

# Item fields a task's own driver can come from (SimConfig.task_fields).
TASK_FIELDS = ("video", "tag", "author", "music", "duration")
SIN_TERMS = 2  # sin terms per task in the nonlinear response
SIN_FREQUENCY = (1.0, 3.0)  # alpha ~ U(lo, hi): a few wiggles over the affinity's +-2 sd range
DURATION_LOG_SD = 0.8  # sd of log duration of normal videos (see _make_videos)


@dataclass(frozen=True)
class SimConfig:
    """Size, seed and behaviour knobs of one simulated world."""

    n_users: int = 5000
    n_videos: int = 8000
    n_authors: int = 1500
    n_impressions: int = 200_000
    seed: int = 0
    task_correlation: float = 0.5
    clickbait_fraction: float = 0.1
    ad_fraction: float = 0.05
    n_tags: int = 60
    n_music: int = 2000
    latent_dim: int = 8
    tag_share: float = 0.5  # share of a video vector's variance explained by its tags
    start_date: str = "2022-04-08"
    n_days: int = 14
    popularity_skew: float = 0.8  # Zipf exponent of video exposure
    # Item field of each task's own driver (click, complete, like), from TASK_FIELDS.
    task_fields: tuple[str, str, str] = ("video", "video", "video")
    nonlinearity: float = 0.0  # amplitude of the task-specific sin response (0 = linear)

    def __post_init__(self) -> None:
        for name in ("n_users", "n_videos", "n_authors", "n_impressions", "n_tags", "n_music"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.latent_dim < 1 or self.n_days < 1:
            raise ValueError("latent_dim and n_days must be >= 1")
        for name in ("clickbait_fraction", "ad_fraction", "tag_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]")
        if not -1.0 <= self.task_correlation <= 1.0:
            raise ValueError("task_correlation must be in [-1, 1]")
        if self.popularity_skew < 0:
            raise ValueError("popularity_skew must be >= 0")
        if len(self.task_fields) != len(TASKS) or not set(self.task_fields) <= set(TASK_FIELDS):
            raise ValueError(
                f"task_fields must name {len(TASKS)} fields (click, complete, like) from "
                f"{TASK_FIELDS}, got {self.task_fields!r}"
            )
        if not (self.nonlinearity >= 0 and np.isfinite(self.nonlinearity)):
            raise ValueError("nonlinearity must be a finite number >= 0")
        np.datetime64(self.start_date, "D")  # raises ValueError on a malformed date


DIFFERENT_FIELDS = ("tag", "duration", "author")  # click by user x tag, completion by user x
# duration, like by user x author

# Named worlds. "default" is the world every earlier figure was measured on (same config and seed
# -> byte-identical data); the other four span task relatedness for `vidrank experiment`, from
# one shared linear driver to conflicting tasks driven by different fields.
PRESETS: dict[str, dict[str, object]] = {
    "default": {},
    "identical": {"task_correlation": 1.0},
    "related": {"task_correlation": 0.5, "task_fields": DIFFERENT_FIELDS, "nonlinearity": 1.0},
    "unrelated": {"task_correlation": 0.0, "task_fields": DIFFERENT_FIELDS, "nonlinearity": 1.0},
    "conflicting": {
        "task_correlation": -0.5,
        "task_fields": DIFFERENT_FIELDS,
        "nonlinearity": 1.0,
    },
}


def preset_config(name: str, **overrides: object) -> SimConfig:
    """The SimConfig of a named preset, with ``overrides`` (sizes, seed, ...) applied on top."""
    if name not in PRESETS:
        raise ValueError(f"unknown simulator preset {name!r}; presets are {list(PRESETS)}")
    return SimConfig(**{**PRESETS[name], **overrides})  # type: ignore[arg-type]


@dataclass
class SimData:
    """Simulated frames: the three KuaiRand-like tables plus per-video ground truth."""

    log: pd.DataFrame
    users: pd.DataFrame
    videos: pd.DataFrame
    video_truth: pd.DataFrame  # video_id, is_clickbait and per-task quality (not a model input)


@dataclass
class _Latent:
    """Per-entity latent vectors [component, entity, dim] and per-task biases [task, entity]."""

    vectors: Floats
    bias: Floats


@dataclass
class _Tabs:
    """Where impressions happen: exposure share per tab and per-task tab effects [task, tab]."""

    weight: Floats
    effect: Floats


def _make_tabs(rng: np.random.Generator) -> _Tabs:
    return _Tabs(
        weight=rng.dirichlet(np.full(N_TABS, 0.6)),
        effect=rng.normal(0.0, 0.2, size=(len(TASKS), N_TABS)),
    )


@dataclass
class _Impressions:
    user: Ints
    video: Ints
    day: Ints  # days since start_date
    minute: Ints  # minute of the (local) day
    tab: Ints


def _sigmoid(x: Floats) -> Floats:
    return np.asarray(1.0 / (1.0 + np.exp(-x)), dtype=np.float64)


def _mix(shared: Floats, own: Floats, rho: float) -> Floats:
    """Per-task mixtures [task, n] of a shared and an own unit-variance driver (unit variance).

    The click row takes +sqrt(|rho|) of the shared driver, the others sign(rho) * sqrt(|rho|):
    for rho >= 0 every pair correlates rho; for rho < 0 click correlates rho with the others.
    """
    signs = np.asarray([1.0] + [1.0 if rho >= 0 else -1.0] * (len(TASKS) - 1))
    weights = (np.sqrt(abs(rho)) * signs).reshape((len(TASKS),) + (1,) * (own.ndim - 1))
    return weights * shared + np.sqrt(1.0 - abs(rho)) * own


def _task_biases(rng: np.random.Generator, n: int, rho: float, sd: float) -> Floats:
    """Per-task entity biases [task, entity] whose cross-task correlation is rho."""
    shared, own = rng.normal(size=n), rng.normal(size=(len(TASKS), n))
    return sd * _mix(shared, own, rho)


def _range_labels(values: Floats, edges: list[float]) -> npt.NDArray[np.object_]:
    """KuaiRand-style bucket labels such as "(10,50]" for counts, with "0" and "N+" at the ends."""
    labels = ["0"] + [f"({lo:g},{hi:g}]" for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
    labels.append(f"{edges[-1]:g}+")
    idx = np.searchsorted(np.asarray(edges), values, side="left")
    return np.asarray(labels, dtype=object)[idx]


def _make_users(cfg: SimConfig, rng: np.random.Generator) -> tuple[pd.DataFrame, _Latent, Floats]:
    """User table, user latent and the exposure weight of each user (active users see more)."""
    n = cfg.n_users
    degree = rng.choice(len(ACTIVE_DEGREES), size=n, p=[0.4, 0.35, 0.15, 0.1])
    follow = np.floor(rng.lognormal(3.0, 1.3, n))
    fans = np.floor(rng.lognormal(1.5, 1.8, n))
    friends = np.floor(rng.lognormal(1.0, 1.2, n))
    register = np.clip(np.floor(rng.lognormal(5.5, 1.0, n)), 8, 3000)
    users = pd.DataFrame(
        {
            "user_id": np.arange(n, dtype=np.int64),
            "user_active_degree": np.asarray(ACTIVE_DEGREES, dtype=object)[degree],
            "is_lowactive_period": (rng.random(n) < 0.03).astype(np.int64),
            "is_live_streamer": (rng.random(n) < 0.05).astype(np.int64),
            "is_video_author": (rng.random(n) < 0.25).astype(np.int64),
            "follow_user_num": follow.astype(np.int64),
            "follow_user_num_range": _range_labels(follow, [0, 10, 50, 100, 150, 250, 500, 1000]),
            "fans_user_num": fans.astype(np.int64),
            "fans_user_num_range": _range_labels(fans, [0, 10, 100, 1000, 10000]),
            "friend_user_num": friends.astype(np.int64),
            "friend_user_num_range": _range_labels(friends, [0, 5, 30, 60, 120, 250]),
            "register_days": register.astype(np.int64),
            "register_days_range": _range_labels(register, [0, 15, 30, 60, 90, 180, 365, 730]),
        }
    )
    # Anonymous one-hot-encoded categories as in KuaiRand; they carry no signal here.
    cardinalities = rng.integers(2, 50, size=18)
    for i, card in enumerate(cardinalities):
        users[f"onehot_feat{i}"] = rng.integers(0, card, size=n, dtype=np.int64)
    # Entries with sd dim^-1/4 give user . video dot products of unit variance.
    vectors = rng.normal(0.0, cfg.latent_dim**-0.25, size=(1 + len(TASKS), n, cfg.latent_dim))
    latent = _Latent(vectors, _task_biases(rng, n, cfg.task_correlation, sd=0.4))
    # Observable user features shift the per-task biases, so they are worth learning.
    latent.bias[0] += np.asarray([DEGREE_CLICK[d] for d in ACTIVE_DEGREES])[degree]
    latent.bias[1] += 0.15 * (np.log1p(register) - 5.5)  # long-time users watch longer
    latent.bias[2] += 0.3 * users["is_video_author"].to_numpy() + 0.1 * (np.log1p(follow) - 3.0)
    activity = np.asarray([4.0, 2.0, 1.0, 0.5])[degree] * rng.lognormal(0.0, 0.5, n)
    return users, latent, activity / activity.sum()


def _sample_tags(cfg: SimConfig, rng: np.random.Generator) -> tuple[Ints, Bools]:
    """Up to MAX_TAGS distinct tags per video (popular tags more often) and their presence mask."""
    width = min(MAX_TAGS, cfg.n_tags)
    popularity = np.log(rng.dirichlet(np.full(cfg.n_tags, 0.7)) + 1e-12)
    # Gumbel top-k draws `width` distinct tags per video without a Python loop.
    keys = popularity + rng.gumbel(size=(cfg.n_videos, cfg.n_tags))
    tags = np.argsort(-keys, axis=1)[:, :width].astype(np.int64)
    n_tags = rng.choice(np.arange(1, width + 1), size=cfg.n_videos, p=_tag_count_probs(width))
    return tags, np.arange(width)[None, :] < n_tags[:, None]


def _tag_count_probs(width: int) -> Floats:
    probs = np.asarray([0.5, 0.35, 0.15][:width])
    return probs / probs.sum()


def _video_vectors(cfg: SimConfig, rng: np.random.Generator, tags: Ints, mask: Bools) -> Floats:
    """Video vectors = a part shared with its tags + a video-specific part (unit variance each).

    The tag part is the sum of the video's tag vectors over sqrt(#tags), so tag ids alone already
    predict part of every user x video affinity.
    """
    scale = cfg.latent_dim**-0.25
    tag_vectors = rng.normal(0.0, scale, size=(1 + len(TASKS), cfg.n_tags, cfg.latent_dim))
    own = rng.normal(0.0, scale, size=(1 + len(TASKS), cfg.n_videos, cfg.latent_dim))
    summed = (tag_vectors[:, tags, :] * mask[None, :, :, None]).sum(axis=2)
    tag_part = summed / np.sqrt(mask.sum(axis=1))[None, :, None]
    return np.sqrt(cfg.tag_share) * tag_part + np.sqrt(1.0 - cfg.tag_share) * own


def _clickbait_flags(cfg: SimConfig, rng: np.random.Generator, author: Ints) -> Bools:
    """Clickbait concentrates on some authors, so author_id is informative too."""
    prone_share = min(1.0, 2.0 * cfg.clickbait_fraction)
    prone_author = rng.random(cfg.n_authors) < prone_share
    per_video = cfg.clickbait_fraction / prone_share if prone_share > 0 else 0.0
    return np.asarray(prone_author[author] & (rng.random(cfg.n_videos) < per_video))


def _make_videos(
    cfg: SimConfig, rng: np.random.Generator
) -> tuple[pd.DataFrame, pd.DataFrame, _Latent, Floats]:
    """Video table, per-video truth table, video latent and exposure weights."""
    n = cfg.n_videos
    author = rng.integers(0, cfg.n_authors, size=n, dtype=np.int64)
    is_ad = rng.random(n) < cfg.ad_fraction
    is_cb = _clickbait_flags(cfg, rng, author)
    tags, mask = _sample_tags(cfg, rng)
    duration_s = np.where(
        is_ad, rng.lognormal(np.log(20.0), 0.4, n), rng.lognormal(np.log(25.0), 0.8, n)
    )
    duration_ms = np.round(np.clip(duration_s, 3.0, 300.0) * 1000.0)
    # Upload day relative to start_date: a quarter appear during the log window (fresh content).
    in_window = rng.random(n) < 0.25
    before = -1 - np.floor(rng.exponential(60.0, n))
    upload_day = np.where(in_window, rng.integers(0, cfg.n_days, n), before).astype(np.int64)
    music = rng.integers(0, cfg.n_music, size=n, dtype=np.int64)

    latent = _Latent(
        _video_vectors(cfg, rng, tags, mask), _task_biases(rng, n, cfg.task_correlation, sd=0.3)
    )
    author_quality = _task_biases(rng, cfg.n_authors, cfg.task_correlation, sd=0.3)
    music_appeal = rng.normal(0.0, 0.15, size=cfg.n_music)
    latent.bias += author_quality[:, author]
    latent.bias[0] += music_appeal[music]

    start = np.datetime64(cfg.start_date, "D")
    videos = pd.DataFrame(
        {
            "video_id": np.arange(n, dtype=np.int64),
            "author_id": author,
            "video_type": np.where(is_ad, "AD", "NORMAL").astype(object),
            "upload_dt": np.datetime_as_string(start + upload_day, unit="D").astype(object),
            "upload_type": rng.choice(["ShortImport", "LongImport", "Web"], n, p=[0.8, 0.1, 0.1]),
            "visible_status": np.full(n, "public", dtype=object),
            "video_duration": duration_ms.astype(np.float64),
            "server_width": np.full(n, 720, dtype=np.int64),
            "server_height": np.full(n, 1280, dtype=np.int64),
            "music_id": music,
            "music_type": rng.choice([4, 7, 8, 9, 11], n).astype(np.int64),
            "tag": _tag_strings(tags, mask),
        }
    )
    truth = pd.DataFrame(
        {
            "video_id": videos["video_id"],
            "is_clickbait": is_cb.astype(np.int8),
            **{f"{task}_quality": latent.bias[i] for i, task in enumerate(TASKS)},
        }
    )
    # Exposure: Zipf over a random popularity order, tilted towards videos that get clicked.
    rank = rng.permutation(n) + 1.0
    weight = rank ** (-cfg.popularity_skew) * np.exp(0.3 * latent.bias[0])
    return videos, truth, latent, weight / weight.sum()


def _tag_strings(tags: Ints, mask: Bools) -> npt.NDArray[np.object_]:
    """Comma-separated tag ids per video (one small loop per video, not per impression)."""
    return np.asarray(
        [",".join(str(t) for t in row[m]) for row, m in zip(tags, mask, strict=True)], dtype=object
    )


def _sample_impressions(
    cfg: SimConfig,
    rng: np.random.Generator,
    user_weight: Floats,
    video_weight: Floats,
    upload_day: Ints,
    tab_weight: Floats,
) -> _Impressions:
    """Who sees what, when and where; never before the video's upload day."""
    n = cfg.n_impressions
    user = rng.choice(cfg.n_users, size=n, p=user_weight)
    video = rng.choice(cfg.n_videos, size=n, p=video_weight)
    day = rng.integers(0, cfg.n_days, size=n)
    # A fresh video can only be shown from its upload day on: redraw such days after it.
    first_day = np.maximum(upload_day[video], 0)
    too_early = day < first_day
    span = cfg.n_days - first_day[too_early]
    day[too_early] = first_day[too_early] + np.floor(rng.random(too_early.sum()) * span)
    hours = np.arange(24)
    hour_weight = 1.0 + 0.8 * np.cos(2 * np.pi * (hours - 21) / 24)  # evening peak
    hour = rng.choice(24, size=n, p=hour_weight / hour_weight.sum())
    minute = hour * 60 + rng.integers(0, 60, size=n)
    tab = rng.choice(N_TABS, size=n, p=tab_weight)
    return _Impressions(
        user.astype(np.int64), video.astype(np.int64), day, minute.astype(np.int64), tab
    )


def _affinity(world: _World, imp: _Impressions, rho: float) -> Floats:
    """Per-task user x item affinity [task, impression]: rho-mixed shared and own drivers.

    The shared driver is user . video; task k's own driver is user_k . (its field's vector).
    """
    users = world.users.vectors
    items = np.concatenate([world.videos.vectors[:1], world.structure.items])
    dots = np.stack(
        [
            np.einsum("nd,nd->n", users[c][imp.user], items[c][imp.video])
            for c in range(1 + len(TASKS))
        ]
    )
    mixed = _mix(dots[0][None, :], dots[1:], rho)
    return _respond(mixed, world.structure)


def _respond(affinity: Floats, structure: _Structure) -> Floats:
    """The task-specific response z + a * sum_i sin(alpha_ki z + beta_ki) (identity if a = 0)."""
    if structure.amplitude == 0:
        return affinity
    waves = np.sin(structure.alpha[:, :, None] * affinity[:, None, :] + structure.beta[:, :, None])
    return np.asarray(affinity + structure.amplitude * waves.sum(axis=1))


@dataclass
class _Structure:
    """How tasks relate beyond rho: each own driver's item vectors and the response's shape."""

    items: Floats  # [task, video, dim]: the per-video vector of each task's field
    alpha: Floats  # [task, SIN_TERMS] frequencies of the nonlinear response
    beta: Floats  # [task, SIN_TERMS] phases
    amplitude: float


def _make_structure(
    cfg: SimConfig, rng: np.random.Generator, videos: pd.DataFrame, video_vectors: Floats
) -> _Structure:
    """Per-task field vectors and sin responses, drawn from their own stream.

    Every field's vectors are drawn whatever ``task_fields`` says, so a knob changes only what it
    names. Unit-variance dot products with the user vectors, as for the video vectors.
    """
    scale = cfg.latent_dim**-0.25
    d, n_tasks = cfg.latent_dim, len(TASKS)
    tag_vectors = rng.normal(0.0, scale, size=(n_tasks, cfg.n_tags, d))
    author_vectors = rng.normal(0.0, scale, size=(n_tasks, cfg.n_authors, d))
    music_vectors = rng.normal(0.0, scale, size=(n_tasks, cfg.n_music, d))
    # Duration: random Fourier features of the standardised log duration, i.e. a smooth
    # preference curve over duration per user (sqrt(2) cos(.) has unit variance over the phase).
    omega = rng.normal(0.0, 1.0, size=(n_tasks, 1, d))
    phase = rng.uniform(0.0, 2 * np.pi, size=(n_tasks, 1, d))
    alpha = rng.uniform(*SIN_FREQUENCY, size=(n_tasks, SIN_TERMS))
    beta = rng.uniform(0.0, 2 * np.pi, size=(n_tasks, SIN_TERMS))
    log_duration = np.log(videos["video_duration"].to_numpy() / 1000.0 / MEDIAN_DURATION_S)
    z = (log_duration / DURATION_LOG_SD)[None, :, None]
    tags, mask = _parse_tags(videos["tag"].to_numpy())
    by_field = {
        "video": video_vectors[1:],
        "tag": (tag_vectors[:, tags, :] * mask[None, :, :, None]).sum(axis=2)
        / np.sqrt(mask.sum(axis=1))[None, :, None],
        "author": author_vectors[:, videos["author_id"].to_numpy(), :],
        "music": music_vectors[:, videos["music_id"].to_numpy(), :],
        "duration": scale * np.sqrt(2.0) * np.cos(omega * z + phase),
    }
    items = np.stack([by_field[f][k] for k, f in enumerate(cfg.task_fields)])
    return _Structure(items, alpha, beta, cfg.nonlinearity)


def _parse_tags(tag_strings: npt.NDArray[np.object_]) -> tuple[Ints, Bools]:
    """The (tags, mask) arrays back from the comma-separated tag strings (one loop per video)."""
    rows = [[int(t) for t in str(s).split(",")] for s in tag_strings]
    tags = np.zeros((len(rows), MAX_TAGS), dtype=np.int64)
    mask = np.zeros((len(rows), MAX_TAGS), dtype=bool)
    for i, row in enumerate(rows):
        tags[i, : len(row)], mask[i, : len(row)] = row, True
    return tags, mask


def _context_effects(tabs: _Tabs, imp: _Impressions) -> Floats:
    """Hour-of-day and tab effects per task [task, impression]."""
    hour = imp.minute // 60
    rows = []
    for i, task in enumerate(TASKS):
        hour_effect = HOUR_AMPLITUDE[task] * np.cos(2 * np.pi * (hour - HOUR_PEAK[task]) / 24)
        rows.append(hour_effect + tabs.effect[i][imp.tab])
    return np.stack(rows)


@dataclass
class _World:
    """Everything fixed before the first impression: the entities and their latent traits."""

    users: _Latent
    videos: _Latent
    is_ad: Bools
    is_clickbait: Bools
    duration_s: Floats
    upload_day: Ints  # days since start_date (negative: uploaded before the log window)
    tabs: _Tabs
    structure: _Structure


def _truth(cfg: SimConfig, world: _World, imp: _Impressions) -> tuple[Floats, Floats, Floats]:
    """Exact p_click, mean watched fraction given click, and p_like given click per impression."""
    affinity = _affinity(world, imp, cfg.task_correlation)
    logit = BIAS_VECTOR[:, None] + AFFINITY_VECTOR[:, None] * affinity
    logit += world.users.bias[:, imp.user] + world.videos.bias[:, imp.video]
    logit += _context_effects(world.tabs, imp)
    is_ad = world.is_ad[imp.video]
    cb = world.is_clickbait[imp.video]
    log_duration = np.log(world.duration_s[imp.video] / MEDIAN_DURATION_S)
    age_days = imp.day - world.upload_day[imp.video]
    logit[0] += CLICKBAIT_CLICK * cb + AD_CLICK * is_ad + DURATION_CLICK * log_duration
    logit[0] += FRESH_CLICK * np.exp(-age_days / FRESH_DAYS)
    logit[1] += CLICKBAIT_COMPLETE * cb + AD_COMPLETE * is_ad + DURATION_COMPLETE * log_duration
    logit[2] += CLICKBAIT_LIKE * cb + AD_LIKE * is_ad
    probs = _sigmoid(logit)
    return probs[0], probs[1], probs[2]


def _upload_days(videos: pd.DataFrame, start_date: str) -> Ints:
    upload = videos["upload_dt"].to_numpy().astype("datetime64[D]")
    return (upload - np.datetime64(start_date, "D")).astype(np.int64)


def _sample_labels(
    rng: np.random.Generator,
    p_click: Floats,
    completion: Floats,
    p_like: Floats,
    duration_ms: Ints,
    is_clickbait: Bools,
) -> dict[str, npt.NDArray[np.int64] | npt.NDArray[np.int8]]:
    """Sample the observable feedback from the truth; every label is 0 without a click."""
    n = len(p_click)
    click = rng.random(n) < p_click
    # Watched fraction ~ Beta with mean `completion`: bounded by the duration (no replays).
    k = WATCH_CONCENTRATION
    c = np.clip(completion, 1e-4, 1 - 1e-4)
    fraction = rng.beta(k * c, k * (1.0 - c))
    play_ms = np.where(click, np.floor(fraction * duration_ms), 0).astype(np.int64)
    like = click & (rng.random(n) < p_like)

    def given_click(base: float, per_like: float) -> Bools:
        return np.asarray(click & (rng.random(n) < base + per_like * like))

    profile = given_click(0.02, 0.1)
    comment_open = given_click(0.03, 0.15)
    labels: dict[str, npt.NDArray[np.int64] | npt.NDArray[np.int8]] = {
        "is_click": click.astype(np.int8),
        "is_like": like.astype(np.int8),
        "is_follow": given_click(0.003, 0.05).astype(np.int8),
        "is_comment": (comment_open & (rng.random(n) < 0.3)).astype(np.int8),
        "is_forward": given_click(0.002, 0.03).astype(np.int8),
        "is_hate": (click & (rng.random(n) < 0.002 + 0.02 * is_clickbait)).astype(np.int8),
        # A "long view": at least 18 s, or 90% of a shorter video.
        "long_view": (click & (play_ms >= np.minimum(18_000, 0.9 * duration_ms))).astype(np.int8),
        "play_time_ms": play_ms,
        "duration_ms": duration_ms,
        "profile_stay_time": np.where(profile, rng.geometric(0.1, n), 0).astype(np.int64),
        "comment_stay_time": np.where(comment_open, rng.geometric(0.05, n), 0).astype(np.int64),
        "is_profile_enter": profile.astype(np.int8),
    }
    return labels


def _time_columns(cfg: SimConfig, rng: np.random.Generator, imp: _Impressions) -> dict[str, Ints]:
    """KuaiRand's date (YYYYMMDD), hourmin (HHMM) in local time and time_ms (UTC epoch ms)."""
    start = np.datetime64(cfg.start_date, "D")
    days = start + np.arange(cfg.n_days)
    ymd = np.char.replace(np.datetime_as_string(days, unit="D"), "-", "").astype(np.int64)
    local_s = (start.astype(np.int64) + imp.day) * 86_400 + imp.minute * 60
    jitter_ms = rng.integers(0, 60_000, size=len(imp.day))
    return {
        "date": ymd[imp.day],
        "hourmin": (imp.minute // 60) * 100 + imp.minute % 60,
        "time_ms": (local_s - BEIJING_OFFSET_S) * 1000 + jitter_ms,
    }


def simulate(cfg: SimConfig) -> SimData:
    """Simulate users, videos and an impression log with sampled labels and truth columns.

    Deterministic per `cfg` (including its seed): each stage draws from its own PCG64 stream
    spawned from the seed, so identical configs give identical frames, and the world (users,
    videos, tabs) does not change with the number of impressions.
    """
    # The structure stream is the sixth child: spawn(6)[:5] are the five streams spawn(5) gives,
    # so the default world is the same as before the structure knobs existed.
    streams = np.random.SeedSequence(cfg.seed).spawn(6)
    user_rng, video_rng, tab_rng, imp_rng, label_rng, structure_rng = map(_generator, streams)
    entities = _entities(cfg, user_rng, video_rng, tab_rng, structure_rng)
    log = _log(cfg, entities, imp_rng, label_rng)
    return SimData(log, entities.users, entities.videos, entities.video_truth)


def _generator(seed: np.random.SeedSequence) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(seed))


@dataclass
class _Entities:
    """The simulated world before any impression: tables, latent world and exposure weights."""

    users: pd.DataFrame
    videos: pd.DataFrame
    video_truth: pd.DataFrame
    world: _World
    user_weight: Floats
    video_weight: Floats


def _entities(
    cfg: SimConfig,
    user_rng: np.random.Generator,
    video_rng: np.random.Generator,
    tab_rng: np.random.Generator,
    structure_rng: np.random.Generator,
) -> _Entities:
    users, user_latent, user_weight = _make_users(cfg, user_rng)
    videos, video_truth, video_latent, video_weight = _make_videos(cfg, video_rng)
    world = _World(
        users=user_latent,
        videos=video_latent,
        is_ad=videos["video_type"].to_numpy() == "AD",
        is_clickbait=video_truth["is_clickbait"].to_numpy().astype(bool),
        duration_s=videos["video_duration"].to_numpy() / 1000.0,
        upload_day=_upload_days(videos, cfg.start_date),
        tabs=_make_tabs(tab_rng),
        structure=_make_structure(cfg, structure_rng, videos, video_latent.vectors),
    )
    return _Entities(users, videos, video_truth, world, user_weight, video_weight)


def _log(
    cfg: SimConfig,
    entities: _Entities,
    imp_rng: np.random.Generator,
    label_rng: np.random.Generator,
) -> pd.DataFrame:
    """``cfg.n_impressions`` impressions of the world, sorted by time_ms."""
    world = entities.world
    imp = _sample_impressions(
        cfg,
        imp_rng,
        entities.user_weight,
        entities.video_weight,
        world.upload_day,
        world.tabs.weight,
    )
    times = _time_columns(cfg, imp_rng, imp)
    p_click, completion, p_like = _truth(cfg, world, imp)
    duration_ms = entities.videos["video_duration"].to_numpy().astype(np.int64)[imp.video]
    is_cb = world.is_clickbait[imp.video]
    labels = _sample_labels(label_rng, p_click, completion, p_like, duration_ms, is_cb)
    log = pd.DataFrame(
        {
            "user_id": imp.user,
            "video_id": imp.video,
            **times,
            **labels,
            "is_rand": np.zeros(cfg.n_impressions, dtype=np.int8),
            "tab": imp.tab,
            "true_p_click": p_click,
            # E[watch s] over the impression space: P(click) * duration * E[fraction | click].
            "true_watch_s": p_click * completion * duration_ms / 1000.0,
            "true_p_like": p_click * p_like,
        }
    )
    order = np.argsort(log["time_ms"].to_numpy(), kind="stable")
    return log.iloc[order].reset_index(drop=True)


def simulate_parts(cfg: SimConfig, out_dir: Path, part_rows: int) -> list[Path]:
    """Write a world too large for memory: ``simulate``'s tables, and the log in parts of at most
    ``part_rows`` impressions (``log_standard_sim-0000i-of-0000N.parquet``); returns the parts.

    The world (users, videos, tabs) is ``simulate``'s for the same config; part i draws its
    impressions and labels from the i-th child of ``simulate``'s impression and label streams,
    so the log is deterministic per (config, part_rows) and at most one part is in memory. Each
    part is time-sorted on its own; the trainer orders the whole log (model/training/stream.py).
    """
    if part_rows < 1:
        raise ValueError("part_rows must be >= 1")
    streams = np.random.SeedSequence(cfg.seed).spawn(6)
    user_rng, video_rng, tab_rng, _, _, structure_rng = map(_generator, streams)
    entities = _entities(cfg, user_rng, video_rng, tab_rng, structure_rng)
    out_dir = _clean_logs(Path(out_dir))
    for name in ("users", "videos", "video_truth"):
        _write(getattr(entities, name), out_dir / SIM_FILES[name])
    n_parts = -(-cfg.n_impressions // part_rows)
    parts = zip(streams[3].spawn(n_parts), streams[4].spawn(n_parts), strict=True)
    paths = []
    for i, (imp_seed, label_seed) in enumerate(parts):
        rows = min(part_rows, cfg.n_impressions - i * part_rows)
        part = replace(cfg, n_impressions=rows)
        log = _log(part, entities, _generator(imp_seed), _generator(label_seed))
        paths.append(out_dir / f"{LOG_STEM}-{i:05d}-of-{n_parts:05d}.parquet")
        _write(log, paths[-1])
    return paths


def true_utility(log: pd.DataFrame, weights: Mapping[str, float] | None = None) -> Floats:
    """Ground-truth value of each impression: a weighted sum of the truth columns.

    weights keys follow the model heads: click (on true_p_click), watch_time (on true_watch_s,
    which already includes P(click)) and like (on true_p_like); missing keys weigh 0.
    """
    w = dict(DEFAULT_UTILITY_WEIGHTS if weights is None else weights)
    unknown = set(w) - {"click", "watch_time", "like"}
    if unknown:
        raise ValueError(f"unknown utility weights: {sorted(unknown)}")
    return np.asarray(
        w.get("click", 0.0) * log["true_p_click"].to_numpy(dtype=np.float64)
        + w.get("watch_time", 0.0) * log["true_watch_s"].to_numpy(dtype=np.float64)
        + w.get("like", 0.0) * log["true_p_like"].to_numpy(dtype=np.float64)
    )


# Longer logs are written in parts of this many impressions (~1.5 GB of simulator arrays each).
PART_ROWS = 2_000_000
LOG_STEM = "log_standard_sim"
SIM_FILES = {
    "log": f"{LOG_STEM}.parquet",
    "users": "user_features_sim.parquet",
    "videos": "video_features_basic_sim.parquet",
    "video_truth": "video_truth_sim.parquet",
}


def write_simulation(data: SimData, out_dir: Path) -> dict[str, Path]:
    """Write the frames as Parquet files named like KuaiRand's; returns the paths by frame."""
    out_dir = _clean_logs(Path(out_dir))
    paths = {}
    for name, filename in SIM_FILES.items():
        paths[name] = _write(getattr(data, name), out_dir / filename)
    return paths


def _write(frame: pd.DataFrame, path: Path) -> Path:
    tmp = path.with_suffix(".parquet.tmp")
    frame.to_parquet(tmp, index=False)
    tmp.replace(path)  # a reader never sees a half-written file
    return path


def _clean_logs(out_dir: Path) -> Path:
    """``out_dir``, created, without the simulated logs of an earlier run (whole or in parts),
    which the trainer would read as more logs of this world."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(f"{LOG_STEM}*.parquet"):
        stale.unlink()
    return out_dir


def run_simulate(
    out: Path,
    impressions: int,
    seed: int,
    task_correlation: float | None = None,
    clickbait_fraction: float | None = None,
    n_users: int | None = None,
    n_videos: int | None = None,
    preset: str = "default",
    part_rows: int = PART_ROWS,
) -> Path:
    """CLI entry point: simulate the preset's world (options override it), write Parquet into
    `out` (the log in parts of ``part_rows`` when it is longer), print a one-line summary."""
    started = time.perf_counter()
    options = {
        "task_correlation": task_correlation,
        "clickbait_fraction": clickbait_fraction,
        "n_users": n_users,
        "n_videos": n_videos,
    }
    overrides = {k: v for k, v in options.items() if v is not None}
    cfg = preset_config(preset, n_impressions=impressions, seed=seed, **overrides)
    if impressions > part_rows:
        logs = simulate_parts(cfg, out, part_rows)
    else:
        logs = [write_simulation(simulate(cfg), out)["log"]]
    columns = ["is_click", "is_like", "play_time_ms"]
    sums = sum(pd.read_parquet(path, columns=columns).sum().to_numpy() for path in logs)
    ctr, like_rate, watch_ms = np.asarray(sums, dtype=np.float64) / impressions
    parts = f" in {len(logs)} parts" if len(logs) > 1 else ""
    print(
        f"simulated {impressions:,} impressions{parts} ({preset} world, {cfg.n_users} users, "
        f"{cfg.n_videos} videos) -> {out}: CTR {ctr:.3f}, like rate {like_rate:.4f}, "
        f"mean watch {watch_ms / 1000.0:.2f}s/impression, {time.perf_counter() - started:.1f}s"
    )
    return Path(out)
