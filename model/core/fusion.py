"""Score fusion: turn the MMoE's per-task predictions into one ranking score.

The model predicts, per candidate, ``click`` (probability), ``watch_time`` (expected seconds) and
``like`` (probability). A :class:`FusionSpec` says how to combine them:

``weighted_sum``
    ``score = sum_k w_k * t_k(p_k)``.
``weighted_product``
    ``prod_k (t_k(p_k) + epsilon) ** w_k``. :func:`fuse` returns the **logarithm** of that product,
    ``sum_k w_k * log(t_k(p_k) + epsilon)``: the log is strictly increasing, so the ranking is the
    same, and unlike the product itself it neither underflows to 0 nor overflows to inf for large
    weights or small predictions (which would turn distinct candidates into ties). Scores of this
    method are therefore usually negative.
``rank_sum``
    ``score = sum_k w_k / (rank_k + beta)`` where ``rank_k`` is the **0-based** position of the
    candidate when this request's candidates are sorted by task ``k``, descending (the best
    candidate has rank 0, so with the default ``beta = 1`` it earns ``w_k``). Equal predictions get
    distinct ranks in input order (stable sort), so the earlier candidate gets the better rank.

``t_k`` is the task's transform: ``identity`` (x), ``log1p`` (log(1 + x)) or ``scale``
(x / scale, e.g. watch seconds / 60). A task that a spec does not name has weight 0.

Scores are always finite for finite, non-negative predictions (what the model's heads emit): a
spec is valid only with ``|weight| <= MAX_WEIGHT``, ``scale >= MIN_SCALE`` and ``beta >=
MIN_BETA``, which keeps every term far inside float64's range (no ``inf - inf``, no overflow).
Without these bounds, weights such as 1e308 made scores NaN, which JSON can only send as null.

Specs come from three places in one dict form (see :meth:`FusionSpec.from_dict`): the bundle
manifest's ``default_fusion``, named profiles in a hot-reloaded TOML file (:class:`ProfileStore`)
and request bodies. :func:`resolve` picks the spec for a request. Every validation error is a
:class:`FusionError` naming the offending field path, e.g. ``fusion.weights.clik``; this module
knows nothing about HTTP.

Only numpy and the standard library are imported here.
"""

from __future__ import annotations

import math
import threading
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

import numpy as np

from model.core.errors import VidrankError, shown
from model.core.fileio import content_stamp
from model.core.tasks import TASKS

METHODS: Final = ("weighted_sum", "weighted_product", "rank_sum")
TRANSFORMS: Final = ("identity", "log1p", "scale")
# Bounds that keep every fused score finite (see the module docstring); far beyond any real use.
MAX_WEIGHT: Final = 1e6
MIN_SCALE: Final = 1e-6
MIN_BETA: Final = 1e-6

_SPEC_KEYS: Final = ("method", "weights", "epsilon", "beta", "name")
_TERM_KEYS: Final = ("weight", "transform", "scale")
_FILE_KEYS: Final = ("default", "profiles", "tuning")


class FusionError(VidrankError, ValueError):
    """An invalid fusion spec, profile file or profile name.

    ``field`` is the dotted path of the offending value (``fusion.weights.clik``,
    ``fusion.profile``, ``profiles.balanced.method`` ...); ``message`` says what is wrong with it.
    """

    code = "invalid_fusion"
    field: str

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message, field)


# --------------------------------------------------------------------------------------------
# Specs
# --------------------------------------------------------------------------------------------


def _r(value: object) -> str:
    """``repr(value)`` cut short: messages echo client input, which may be huge."""
    return shown(repr(value))


def _is_number(value: object) -> bool:
    """True for int and float values, but not for bool (a JSON ``true`` is not a weight)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_weight(weight: object, field: str) -> None:
    """A weight is a number within +-MAX_WEIGHT (so never NaN or infinite)."""
    number = isinstance(weight, int | float) and not isinstance(weight, bool)
    if not number or not abs(weight) <= MAX_WEIGHT:  # type: ignore[arg-type]  # NaN: False
        raise FusionError(
            field, f"must be a number in [-{MAX_WEIGHT:g}, {MAX_WEIGHT:g}], got {_r(weight)}"
        )


def _check_term(weight: float, transform: str, scale: float, path: str) -> None:
    """Validate one task term; errors name ``path.weight`` / ``path.transform`` / ``path.scale``."""
    _check_weight(weight, f"{path}.weight")
    if transform not in TRANSFORMS:
        raise FusionError(
            f"{path}.transform", f"unknown transform {_r(transform)}; expected one of {TRANSFORMS}"
        )
    if not _is_number(scale) or not math.isfinite(scale) or scale < MIN_SCALE:
        raise FusionError(
            f"{path}.scale", f"must be a finite number >= {MIN_SCALE:g}, got {_r(scale)}"
        )
    if transform != "scale" and scale != 1.0:
        raise FusionError(f"{path}.scale", "is only used with transform 'scale'")


@dataclass(frozen=True)
class TaskTerm:
    """Weight and transform of one task in a fusion spec.

    ``transform`` is ``identity`` (x), ``log1p`` (log(1 + x)) or ``scale`` (x / ``scale``).
    """

    weight: float
    transform: str = "identity"
    scale: float = 1.0

    def __post_init__(self) -> None:
        _check_term(self.weight, self.transform, self.scale, "term")
        object.__setattr__(self, "weight", float(self.weight))
        object.__setattr__(self, "scale", float(self.scale))

    def apply(self, values: np.ndarray) -> np.ndarray:
        """Return ``t(values)`` as float64 (vectorised)."""
        x = np.asarray(values, dtype=np.float64)
        if self.transform == "log1p":
            return np.log1p(x)
        if self.transform == "scale":
            return x / self.scale
        return x

    def to_value(self) -> float | dict[str, Any]:
        """Dict-form value: a bare number for the identity transform, else a table."""
        if self.transform == "identity":
            return self.weight
        out: dict[str, Any] = {"weight": self.weight, "transform": self.transform}
        if self.transform == "scale":
            out["scale"] = self.scale
        return out


def _check_spec(
    method: str, terms: Mapping[str, TaskTerm], epsilon: float, beta: float, prefix: str
) -> None:
    """Validate spec-level fields; errors name ``prefix.method``, ``prefix.weights.<task>`` ..."""
    if method not in METHODS:
        raise FusionError(
            f"{prefix}.method", f"unknown method {_r(method)}; expected one of {METHODS}"
        )
    for task, term in terms.items():
        if task not in TASKS:
            raise FusionError(
                f"{prefix}.weights.{shown(str(task))}", f"unknown task; expected one of {TASKS}"
            )
        if not isinstance(term, TaskTerm):
            raise FusionError(f"{prefix}.weights.{task}", "must be a TaskTerm")
    if not any(term.weight != 0.0 for term in terms.values()):
        raise FusionError(f"{prefix}.weights", "at least one task needs a non-zero weight")
    if not _is_number(epsilon) or not math.isfinite(epsilon) or epsilon <= 0:
        raise FusionError(f"{prefix}.epsilon", f"must be a finite number > 0, got {_r(epsilon)}")
    if not _is_number(beta) or not math.isfinite(beta) or beta < MIN_BETA:
        raise FusionError(
            f"{prefix}.beta", f"must be a finite number >= {MIN_BETA:g}, got {_r(beta)}"
        )


@dataclass(frozen=True)
class FusionSpec:
    """How to fuse the task predictions into one score (see the module docstring).

    ``terms`` maps task name to :class:`TaskTerm`; absent tasks have weight 0. It is copied into
    a read-only mapping on construction. ``epsilon`` is used by ``weighted_product`` only,
    ``beta`` by ``rank_sum`` only; both must be > 0. ``name`` is the profile name, if any.
    Construction validates and raises :class:`FusionError` with paths under ``fusion.``; use
    :meth:`from_dict` for untrusted input (it reports paths under the prefix you give).
    """

    method: str
    terms: Mapping[str, TaskTerm] = field(hash=False)
    epsilon: float = 1e-6
    beta: float = 1.0
    name: str | None = None

    def __post_init__(self) -> None:
        _check_spec(self.method, self.terms, self.epsilon, self.beta, "fusion")
        object.__setattr__(self, "terms", MappingProxyType(dict(self.terms)))
        object.__setattr__(self, "epsilon", float(self.epsilon))
        object.__setattr__(self, "beta", float(self.beta))

    def weight(self, task: str) -> float:
        """The weight of ``task`` (0 when the spec does not name it)."""
        term = self.terms.get(task)
        return term.weight if term is not None else 0.0

    @classmethod
    def from_dict(cls, d: object, field_prefix: str = "fusion") -> FusionSpec:
        """Parse the dict form used by manifests, TOML profiles and request bodies.

        ``{"method": "weighted_sum", "weights": {"click": 1.0, "watch_time": {"weight": 0.5,
        "transform": "log1p"}}, "epsilon": 1e-6, "beta": 1.0, "name": "..."}``; ``method`` and
        ``weights`` are required. A weight is a bare number (identity transform) or a table with
        ``weight`` (required), ``transform`` and ``scale``. Unknown keys are rejected. Errors are
        :class:`FusionError` whose field starts with ``field_prefix``.
        """
        if not isinstance(d, Mapping):
            raise FusionError(field_prefix, "must be an object with method and weights")
        for key in d:
            if key not in _SPEC_KEYS:
                raise FusionError(
                    f"{field_prefix}.{shown(str(key))}", f"unknown key; expected {_SPEC_KEYS}"
                )
        method = _required(d, "method", field_prefix)
        if not isinstance(method, str):
            raise FusionError(f"{field_prefix}.method", "must be a string")
        terms = _parse_weights(_required(d, "weights", field_prefix), f"{field_prefix}.weights")
        epsilon = d.get("epsilon", 1e-6)
        beta = d.get("beta", 1.0)
        name = d.get("name")
        if name is not None and not isinstance(name, str):
            raise FusionError(f"{field_prefix}.name", "must be a string")
        _check_spec(method, terms, epsilon, beta, field_prefix)
        return cls(method=method, terms=terms, epsilon=epsilon, beta=beta, name=name)

    def to_dict(self) -> dict[str, Any]:
        """The dict form; ``FusionSpec.from_dict(spec.to_dict()) == spec``."""
        out: dict[str, Any] = {
            "method": self.method,
            "weights": {task: term.to_value() for task, term in self.terms.items()},
            "epsilon": self.epsilon,
            "beta": self.beta,
        }
        if self.name is not None:
            out["name"] = self.name
        return out


def _required(d: Mapping[str, Any], key: str, prefix: str) -> Any:
    """``d[key]``, or a FusionError naming ``prefix.key`` when it is missing."""
    if key not in d:
        raise FusionError(f"{prefix}.{key}", "is required")
    return d[key]


def _parse_weights(weights: object, path: str) -> dict[str, TaskTerm]:
    """Parse the ``weights`` table: task name -> bare number or {weight, transform, scale}."""
    if not isinstance(weights, Mapping):
        raise FusionError(path, "must be an object mapping task names to weights")
    terms: dict[str, TaskTerm] = {}
    for task, value in weights.items():
        task_path = f"{path}.{shown(str(task))}"
        if task not in TASKS:
            raise FusionError(task_path, f"unknown task; expected one of {TASKS}")
        terms[task] = _parse_term(value, task_path)
    return terms


def _parse_term(value: object, path: str) -> TaskTerm:
    """Parse one task's weight: a bare number or a table; errors name ``path`` or a sub-key."""
    if _is_number(value):
        assert isinstance(value, int | float)
        _check_weight(value, path)
        assert isinstance(value, int | float)
        return TaskTerm(weight=float(value))
    if not isinstance(value, Mapping):
        raise FusionError(path, "must be a number or an object with weight/transform/scale")
    for key in value:
        if key not in _TERM_KEYS:
            raise FusionError(f"{path}.{shown(str(key))}", f"unknown key; expected {_TERM_KEYS}")
    weight = _required(value, "weight", path)
    transform = value.get("transform", "identity")
    scale = value.get("scale", 1.0)
    if not isinstance(transform, str):
        raise FusionError(f"{path}.transform", "must be a string")
    _check_term(weight, transform, scale, path)
    return TaskTerm(weight=weight, transform=transform, scale=scale)


# --------------------------------------------------------------------------------------------
# Fusion
# --------------------------------------------------------------------------------------------


def _prediction_arrays(spec: FusionSpec, preds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """float64 1-D views of the predictions the spec uses; checks presence and equal lengths.

    Missing or misshapen predictions are a programming error (the model always emits every
    task), so they raise ``ValueError`` rather than :class:`FusionError`.
    """
    arrays: dict[str, np.ndarray] = {}
    for task, term in spec.terms.items():
        if term.weight == 0.0:
            continue
        if task not in preds:
            raise ValueError(f"predictions lack task {task!r}")
        arr = np.asarray(preds[task], dtype=np.float64)
        if arr.ndim != 1:
            raise ValueError(f"predictions[{task!r}] must be 1-D, got shape {arr.shape}")
        arrays[task] = arr
    if len({arr.shape[0] for arr in arrays.values()}) > 1:
        shapes = {task: arr.shape[0] for task, arr in arrays.items()}
        raise ValueError(f"predictions have different lengths: {shapes}")
    return arrays


def rank_order(scores: np.ndarray) -> np.ndarray:
    """Indices that sort ``scores`` descending; ties keep input order; NaN scores come last.

    numpy sorts NaN to the end of an ascending sort and treats NaNs as equal to each other, so
    a stable argsort of ``-scores`` gives exactly this (``-nan`` is nan).
    """
    s = np.asarray(scores, dtype=np.float64)
    return np.argsort(-s, kind="stable")


def task_ranks(values: np.ndarray) -> np.ndarray:
    """0-based descending rank of every candidate for one task (stable: ties by input order)."""
    order = rank_order(values)
    ranks = np.empty(order.shape[0], dtype=np.float64)
    ranks[order] = np.arange(order.shape[0], dtype=np.float64)
    return ranks


Terms = dict[str, np.ndarray]


def _weighted_sum(spec: FusionSpec, arrays: Mapping[str, np.ndarray]) -> Terms:
    """w_k * t_k(p_k) per task."""
    return {task: spec.terms[task].weight * spec.terms[task].apply(v) for task, v in arrays.items()}


def _log_weighted_product(spec: FusionSpec, arrays: Mapping[str, np.ndarray]) -> Terms:
    """w_k * log(t_k(p_k) + eps) per task: the log of prod_k (t_k(p_k) + eps)^w_k, term by term."""
    return {
        task: spec.terms[task].weight * np.log(spec.terms[task].apply(v) + spec.epsilon)
        for task, v in arrays.items()
    }


def _rank_sum(spec: FusionSpec, arrays: Mapping[str, np.ndarray]) -> Terms:
    """w_k / (rank_k + beta) per task, with 0-based ranks (transforms do not change ranks)."""
    return {
        task: spec.terms[task].weight / (task_ranks(v) + spec.beta) for task, v in arrays.items()
    }


_TERMS: Final[dict[str, Callable[[FusionSpec, Mapping[str, np.ndarray]], Terms]]] = {
    "weighted_sum": _weighted_sum,
    "weighted_product": _log_weighted_product,
    "rank_sum": _rank_sum,
}


def fuse_terms(spec: FusionSpec, preds: Mapping[str, np.ndarray]) -> tuple[np.ndarray, Terms]:
    """The fused score per candidate and each task's additive term of it.

    The score is the sum of the terms, added in ``TASKS`` order, so adding a candidate's terms
    in that order gives its score exactly; tasks the spec does not weigh have no term. The
    terms are what ``"explain": true`` returns: for ``weighted_sum`` ``w_k * t_k(p_k)``, for
    ``weighted_product`` ``w_k * log(t_k(p_k) + epsilon)`` (the score is the log of the
    product), for ``rank_sum`` ``w_k / (rank_k + beta)``.
    """
    arrays = _prediction_arrays(spec, preds)
    n = next(iter(arrays.values())).shape[0] if arrays else 0
    if n == 0:
        return np.zeros(0, dtype=np.float64), {}
    with np.errstate(invalid="ignore", divide="ignore"):
        terms = _TERMS[spec.method](spec, arrays)
    score = np.zeros(n, dtype=np.float64)
    for task in TASKS:
        if task in terms:
            score += terms[task]
    return score, terms


def _grouped_ranks(values: np.ndarray, codes: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """0-based descending rank of every row within its group (stable, like :func:`task_ranks`).

    ``codes`` are dense group codes and ``starts[c]`` the first sorted position of group ``c``.
    ``np.lexsort`` is stable and sorts NaN last, as ``rank_order`` does within one request.
    """
    order = np.lexsort((-values, codes))
    ranks = np.empty(values.shape[0], dtype=np.float64)
    ranks[order] = np.arange(values.shape[0]) - starts[codes[order]]
    return ranks


def fuse_lists(spec: FusionSpec, preds: Mapping[str, np.ndarray], groups: np.ndarray) -> np.ndarray:
    """Fused scores of many candidate lists at once; equal to :func:`fuse` on each list.

    ``groups`` (length N) names the list (request) of every row. Only ``rank_sum`` depends on
    the other candidates of a list, so only it is computed per group (vectorised); the other
    methods score each candidate on its own and are plain :func:`fuse`. For offline evaluation
    and tuning, where a frame holds thousands of users' lists.
    """
    if spec.method != "rank_sum":
        return fuse(spec, preds)
    arrays = _prediction_arrays(spec, preds)
    codes = np.unique(np.asarray(groups), return_inverse=True)[1].reshape(-1)
    n = codes.shape[0]
    if any(arr.shape[0] != n for arr in arrays.values()):
        raise ValueError(f"groups has {n} rows, the predictions do not")
    starts = np.concatenate(([0], np.cumsum(np.bincount(codes))[:-1])) if n else codes
    score = np.zeros(n, dtype=np.float64)
    for task, values in arrays.items():
        score += spec.terms[task].weight / (_grouped_ranks(values, codes, starts) + spec.beta)
    return score


def fuse(spec: FusionSpec, preds: Mapping[str, np.ndarray]) -> np.ndarray:
    """Fused float64 score per candidate, shape [N]; higher is better. Fully vectorised.

    ``preds`` maps task name to a 1-D array of length N (extra keys are ignored; tasks with
    weight 0 may be absent). For ``weighted_product`` the score is the log of the product (see
    the module docstring). Invalid predictions (e.g. NaN, or negative values under ``log1p`` or
    ``weighted_product``) yield NaN scores, which :func:`rank_order` puts last.
    """
    return fuse_terms(spec, preds)[0]


# --------------------------------------------------------------------------------------------
# Profiles
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Profiles:
    """One successfully loaded profile file."""

    specs: Mapping[str, FusionSpec]
    default: str | None


_NO_PROFILES: Final = _Profiles(specs=MappingProxyType({}), default=None)


def parse_profiles(data: Mapping[str, Any]) -> tuple[dict[str, FusionSpec], str | None]:
    """Parse a decoded profile file: ``{"default": name?, "profiles": {name: spec dict}}``.

    An optional ``tuning`` table (what ``vidrank tune-fusion`` records about the profiles it
    wrote: objective, value, search space, data) is documentation for people and reports; it
    must be a table and is otherwise ignored here. Errors name paths such as
    ``profiles.balanced.weights.clik`` or ``default``.
    """
    for key in data:
        if key not in _FILE_KEYS:
            raise FusionError(key, f"unknown top-level key; expected {_FILE_KEYS}")
    if not isinstance(data.get("tuning", {}), Mapping):
        raise FusionError("tuning", "must be a table (tuning records by profile name)")
    tables = data.get("profiles", {})
    if not isinstance(tables, Mapping):
        raise FusionError("profiles", "must be a table of profiles")
    specs = {
        name: replace(FusionSpec.from_dict(table, f"profiles.{name}"), name=name)
        for name, table in tables.items()
    }
    default = data.get("default")
    if default is not None and (not isinstance(default, str) or default not in specs):
        raise FusionError("default", f"names no profile in this file: {default!r}")
    return specs, default


def _read_stamped(path: Path) -> tuple[bytes | OSError, object]:
    """The file's bytes (or why it cannot be read) and its stamp, the one "changed?" check
    (``fileio.content_stamp``: a content hash, which neither coarse mtimes nor NFS attribute
    caching can fool)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        return e, ("error", e.errno)
    return data, content_stamp(data)


class ProfileStore:
    """Named fusion profiles from a TOML file, hot-reloaded, with an optional fallback spec.

    File format::

        default = "balanced"           # optional: profile used when a request names none
        [profiles.balanced]
        method = "weighted_product"
        weights = { click = 1.0, watch_time = { weight = 0.6, transform = "log1p" }, like = 0.4 }
        [tuning.balanced]              # optional, ignored: how vidrank tune-fusion found it

    On :meth:`get` the store reads the file at most once per ``check_interval_s`` (measured
    with ``clock``) and parses it again when its content stamp changed. A file that
    fails to load (unreadable, bad TOML, invalid profile) keeps the last good profiles; the
    error is kept in :attr:`last_error` until a later load succeeds. A file missing at start
    means no profiles (fallback only) and sets :attr:`last_error`; if it appears later it is
    loaded. ``path=None`` means no profile file at all. Writers should replace the file
    atomically (write a temp file, rename). Without that, a reader may catch the file mid-write:
    a torn read has other content than the finished file, so the next check loads that; an empty
    file is rejected (keeping the last good profiles), but a half-written file that happens to
    parse cannot be told apart from an intended edit.

    Counters (for logs and metrics) include the constructor's load: :attr:`reloads` counts
    successful loads, :attr:`reload_failures` failed ones; ``on_failure`` (if given) is called
    with the error text on each failed load, the constructor's included, with the store's lock
    held (keep it cheap: count, log). Thread-safe.

    Without a ``fallback`` (the service passes the serving bundle's default to :meth:`get`
    instead) a lookup of "the default" in a file that names none raises ``FusionError``.
    """

    def __init__(
        self,
        path: Path | None,
        fallback: FusionSpec | None = None,
        *,
        check_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        on_failure: Callable[[str], None] | None = None,
    ) -> None:
        self.path = path
        self.fallback = fallback
        self.on_failure = on_failure
        self.check_interval_s = check_interval_s
        self.last_error: str | None = None
        self.reloads = 0
        self.reload_failures = 0
        self._clock = clock
        self._lock = threading.Lock()
        self._profiles = _NO_PROFILES
        self._signature: object = None
        self._last_check = clock()
        if path is not None:
            with self._lock:
                self._load(*_read_stamped(path))

    def get(self, name: str | None = None, fallback: FusionSpec | None = None) -> FusionSpec:
        """The profile called ``name``; for None the file's default profile, else the fallback.

        ``fallback`` overrides the store's fallback for this call. An unknown name, or None with
        neither a default profile nor a fallback, raises ``FusionError("fusion.profile", ...)``.
        """
        profiles = self._current()
        if name is None:
            if profiles.default is not None:
                return profiles.specs[profiles.default]
            spec = fallback if fallback is not None else self.fallback
            if spec is None:
                raise FusionError("fusion.profile", "no default profile and no fallback")
            return spec
        spec = profiles.specs.get(name)
        if spec is None:
            known = ", ".join(profiles.specs) or "none"
            raise FusionError("fusion.profile", f"unknown profile {_r(name)} (known: {known})")
        return spec

    def names(self) -> list[str]:
        """Profile names in file order."""
        return list(self._current().specs)

    @property
    def default_name(self) -> str | None:
        """The name of the file's default profile, if it names one."""
        return self._current().default

    def reload(self) -> bool:
        """Check the file now (ignoring the interval); True when new profiles were loaded."""
        with self._lock:
            self._last_check = self._clock()
            return self._reload_if_changed()

    def _current(self) -> _Profiles:
        """The live profiles, after a rate-limited change check."""
        if self.path is not None:
            with self._lock:
                now = self._clock()
                if now - self._last_check >= self.check_interval_s:
                    self._last_check = now
                    self._reload_if_changed()
        return self._profiles

    def _reload_if_changed(self) -> bool:
        """Reload when the file's signature changed since the last attempt. Holds the lock."""
        if self.path is None:
            return False
        data, signature = _read_stamped(self.path)
        if signature == self._signature:
            return False
        return self._load(data, signature)

    def _load(self, data: bytes | OSError, signature: object) -> bool:
        """Parse the file's bytes; on failure keep the old profiles. Holds the lock.

        A broken file is not retried until its content changes again. An empty file counts as
        a failure: it is what a reader sees in the middle of a truncate-and-write, and it would
        otherwise silently drop every profile.
        """
        self._signature = signature
        try:
            if isinstance(data, OSError):
                raise data
            if not data.strip():
                raise FusionError("profiles", "the profile file is empty")
            specs, default = parse_profiles(tomllib.loads(data.decode("utf-8")))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, FusionError) as exc:
            self.reload_failures += 1
            self.last_error = f"{self.path}: {exc}"
            if self.on_failure is not None:
                self.on_failure(self.last_error)
            return False
        self._profiles = _Profiles(specs=MappingProxyType(specs), default=default)
        self.reloads += 1
        self.last_error = None
        return True


def resolve(
    store: ProfileStore | None,
    request_fusion: None | str | Mapping[str, Any] | FusionSpec,
    bundle_default: FusionSpec,
) -> FusionSpec:
    """The spec for one request.

    - None: the profile file's default profile, else ``bundle_default``;
    - a string, or ``{"profile": name}``: that profile (``FusionError("fusion.profile")`` if
      unknown or if there is no store);
    - a mapping with method + weights: :meth:`FusionSpec.from_dict` under ``fusion``;
    - a :class:`FusionSpec`: itself.
    """
    if request_fusion is None:
        return store.get(None, fallback=bundle_default) if store is not None else bundle_default
    if isinstance(request_fusion, FusionSpec):
        return request_fusion
    if isinstance(request_fusion, str):
        return _profile(store, request_fusion)
    if not isinstance(request_fusion, Mapping):
        raise FusionError("fusion", "must be a profile name or an object with method and weights")
    if "profile" in request_fusion:
        if len(request_fusion) > 1:
            raise FusionError("fusion", "give either a profile or method + weights, not both")
        name = request_fusion["profile"]
        if not isinstance(name, str):
            raise FusionError("fusion.profile", "must be a string")
        return _profile(store, name)
    return FusionSpec.from_dict(request_fusion, "fusion")


def _profile(store: ProfileStore | None, name: str) -> FusionSpec:
    """Profile ``name`` from ``store``; without a store every name is unknown."""
    if store is None:
        raise FusionError("fusion.profile", f"unknown profile {_r(name)} (no profiles configured)")
    return store.get(name)
