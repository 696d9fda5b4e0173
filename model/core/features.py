"""Declarative feature schema and its vectorised encoder (numpy + stdlib only).

One encoder serves both sides: the trainer encodes its logs with this code and the service encodes
requests with the same code, read back from the bundle's manifest, so there is no
training/serving skew.

Encoded layout, per entity e in (user, context, item), a group present only when the entity has
such features (see docs/internals.md):

- ``{e}_cat``     int64   [B, n_cat]       index into the entity's embedding table
- ``{e}_multi``   int64   [B, n_multi, L]  same index space; padding slots hold 0 with weight 0
- ``{e}_multi_w`` float32 [B, n_multi, L]  1/count for present slots (mean pooling), 0 for padding
- ``{e}_num``     float32 [B, n_num]       transformed, standardised and clipped numerics

Categorical values are hashed into buckets (no vocabulary, so no vocabulary miss): integers, and
strings of ASCII digits that spell an integer, hash through a splitmix64 finaliser; other strings
through blake2b. ``42`` and ``"42"`` land in the same bucket; ``"³"`` or ``"٣"`` are ordinary
strings. Booleans are not categories or numbers: ``true`` is rejected, not read as 1.

Strings are bounded: a value longer than :data:`MAX_STRING_CHARS` is a :class:`FeatureError`.
String keys and tag lists are cached (ids and tags repeat across requests), but only strings of
at most :data:`CACHE_KEY_CHARS` characters, in caches whose size is derived from a byte budget
(:data:`KEY_CACHE_BYTES`, :data:`TOKEN_CACHE_BYTES`): whatever clients send, the caches hold at
most that much memory. A column is encoded whole: int and float columns in one numpy call each,
a text column by one C-level lookup of all its strings in the cache, which keeps each string's
keys packed as bytes that join into one uint64 buffer, so a column of known strings runs no
Python per value; blake2b runs once per string new to the cache (a numpy blake2b over a
fixed-width view of the column would be slower than hashlib at request sizes: its ~500 ufunc
calls per 128-byte block cost more than hashing 500 short strings one by one).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
import sys
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, cast

import numpy as np

from model.core.errors import VidrankError

ENTITIES: tuple[str, ...] = ("user", "context", "item")
KINDS: tuple[str, ...] = ("categorical", "multi_categorical", "numeric")
TRANSFORMS: tuple[str, ...] = ("identity", "log1p")
NUMERIC_CLIP = 10.0  # standardised numerics are clipped to +-this many standard deviations
MAX_STRING_CHARS = 256  # longest string value (id, category, tag or tag list) that is encoded
CACHE_KEY_CHARS = 64  # only strings up to this long are cached; longer ones are hashed each time
KEY_CACHE_BYTES = 16 << 20  # string -> key cache: memory it may hold at most
TOKEN_CACHE_BYTES = 8 << 20  # tag list string -> keys cache: memory it may hold at most

Entity = Literal["user", "context", "item"]
Kind = Literal["categorical", "multi_categorical", "numeric"]


class FeatureError(VidrankError, ValueError):
    """A feature value that cannot be encoded: names the entity, the feature and the row.

    The encoder raises only this for bad values, so a caller can name the input that held the
    value (the service turns ``entity``/``feature``/``row`` into a request field path).
    """

    code = "invalid_feature"

    def __init__(self, feature: str, message: str, *, entity: str = "", row: int | None = None):
        super().__init__(message)
        self.feature = feature
        self.entity = entity
        self.row = row

    def __str__(self) -> str:
        where = f"{self.entity}.{self.feature}" if self.entity else self.feature
        if self.row is not None:
            where += f"[{self.row}]"
        return f"{where}: {self.message}"


@dataclass(frozen=True)
class Feature:
    """One input feature: where it comes from, how it is encoded and what replaces it if absent."""

    name: str
    entity: Entity
    kind: Kind
    buckets: int = 0  # categorical / multi_categorical: hash buckets
    max_len: int = 0  # multi_categorical: values kept per row
    transform: str = "identity"  # numeric: applied before standardisation
    mean: float = 0.0  # numeric: fitted on training data (after the transform)
    std: float = 1.0
    default: str | int | float | None = None  # None for numerics means "the training mean"

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").isalnum():
            raise ValueError(f"feature name {self.name!r} must be alphanumeric/underscore")
        if self.entity not in ENTITIES:
            raise ValueError(f"feature {self.name}: entity must be one of {ENTITIES}")
        if self.kind not in KINDS:
            raise ValueError(f"feature {self.name}: kind must be one of {KINDS}")
        if self.kind != "numeric" and self.buckets < 1:
            raise ValueError(f"feature {self.name}: a {self.kind} feature needs buckets >= 1")
        if self.kind == "multi_categorical" and self.max_len < 1:
            raise ValueError(f"feature {self.name}: multi_categorical needs max_len >= 1")
        if self.kind == "numeric":
            if self.transform not in TRANSFORMS:
                raise ValueError(f"feature {self.name}: transform must be one of {TRANSFORMS}")
            if not (math.isfinite(self.mean) and math.isfinite(self.std) and self.std > 0):
                raise ValueError(f"feature {self.name}: mean/std must be finite, std > 0")


@dataclass(frozen=True)
class EntityLayout:
    """Sizes of one entity's encoded groups, which the model needs to build its input layers."""

    entity: str
    cat: tuple[str, ...] = ()
    multi: tuple[str, ...] = ()
    num: tuple[str, ...] = ()
    max_len: int = 0
    offsets: dict[str, int] = field(default_factory=dict)
    table_size: int = 0


@dataclass(frozen=True)
class FeatureSchema:
    """An ordered set of features; serialisable into a bundle manifest."""

    features: tuple[Feature, ...]

    def __post_init__(self) -> None:
        names = [f.name for f in self.features]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate feature names: {dupes}")

    # -- construction / serialisation -------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"features": [asdict(f) for f in self.features]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FeatureSchema:
        try:
            return cls(tuple(Feature(**f) for f in d["features"]))
        except (KeyError, TypeError) as e:
            raise ValueError(f"invalid feature schema: {e}") from e

    def names(self, entity: str | None = None) -> list[str]:
        return [f.name for f in self.features if entity is None or f.entity == entity]

    def by_name(self, name: str) -> Feature:
        return self._by_name[name]

    @functools.cached_property
    def _by_name(self) -> dict[str, Feature]:
        return {f.name: f for f in self.features}

    def fit(self, columns: Mapping[str, Any]) -> FeatureSchema:
        """Return a copy whose numeric features carry mean/std fitted on ``columns``."""
        moments = {}
        for f in self.features:
            if f.kind == "numeric" and f.name in columns:
                x = self.numeric_values(f.name, columns[f.name])
                moments[f.name] = (float(x.mean()), float(x.std()))
        return self.with_moments(moments)

    def numeric_values(self, name: str, values: Any) -> np.ndarray:
        """A numeric feature's values after its transform, before standardisation (float64):
        what ``fit`` takes the moments of (a streaming reader accumulates them chunk by chunk)."""
        f = self.by_name(name)
        return _apply_transform(f, _to_float(f, values, len(values)))

    def with_moments(self, moments: Mapping[str, tuple[float, float]]) -> FeatureSchema:
        """A copy whose numeric features named in ``moments`` standardise by (mean, std); a std
        of at most 1e-6 (a constant column) is taken as 1."""
        fitted = []
        for f in self.features:
            if f.kind == "numeric" and f.name in moments:
                mean, std = moments[f.name]
                f = replace(f, mean=mean, std=std if std > 1e-6 else 1.0)
            fitted.append(f)
        return FeatureSchema(tuple(fitted))

    # -- layout ------------------------------------------------------------------------------
    def layout(self, entity: str) -> EntityLayout:
        """Sizes and offsets of one entity's groups (computed once: the schema is immutable)."""
        return self._layouts[entity]

    @functools.cached_property
    def _layouts(self) -> dict[str, EntityLayout]:
        return {e: self._layout(e) for e in ENTITIES}

    def _layout(self, entity: str) -> EntityLayout:
        feats = [f for f in self.features if f.entity == entity]
        offsets: dict[str, int] = {}
        size = 0
        for f in feats:
            if f.kind != "numeric":
                offsets[f.name] = size
                size += f.buckets
        return EntityLayout(
            entity=entity,
            cat=tuple(f.name for f in feats if f.kind == "categorical"),
            multi=tuple(f.name for f in feats if f.kind == "multi_categorical"),
            num=tuple(f.name for f in feats if f.kind == "numeric"),
            max_len=max((f.max_len for f in feats if f.kind == "multi_categorical"), default=0),
            offsets=offsets,
            table_size=size,
        )

    def input_specs(self) -> list[dict[str, Any]]:
        """ONNX input names, dtypes and shapes (batch 1 for user/context, "N" for items)."""
        specs: list[dict[str, Any]] = []
        for e in ENTITIES:
            lay = self.layout(e)
            b: int | str = "N" if e == "item" else 1
            if lay.cat:
                specs.append({"name": f"{e}_cat", "dtype": "int64", "shape": [b, len(lay.cat)]})
            if lay.multi:
                shape = [b, len(lay.multi), lay.max_len]
                specs.append({"name": f"{e}_multi", "dtype": "int64", "shape": shape})
                specs.append({"name": f"{e}_multi_w", "dtype": "float32", "shape": shape})
            if lay.num:
                specs.append({"name": f"{e}_num", "dtype": "float32", "shape": [b, len(lay.num)]})
        return specs

    # -- encoding ----------------------------------------------------------------------------
    def encode_entity(self, entity: str, columns: Mapping[str, Any], n: int) -> dict[str, Any]:
        """Encode ``n`` rows of one entity from columns (name -> sequence of length n).

        A column that is absent, or a value that is None, takes the feature's default. Names in
        ``columns`` that are not features of this entity are ignored.
        """
        try:
            return self._encode_entity(self.layout(entity), columns, n)
        except FeatureError as e:
            e.entity = entity  # the value-level helpers know the feature, not its entity
            raise

    def _encode_entity(self, lay: EntityLayout, columns: Mapping[str, Any], n: int) -> dict:
        entity = lay.entity
        out: dict[str, np.ndarray] = {}
        cats, nums = self._encoders[entity]
        if lay.cat:
            out[f"{entity}_cat"] = cats.encode(columns, n)
        if lay.multi:
            idx = np.zeros((n, len(lay.multi), lay.max_len), dtype=np.int64)
            w = np.zeros((n, len(lay.multi), lay.max_len), dtype=np.float32)
            for j, name in enumerate(lay.multi):
                idx[:, j], w[:, j] = self._encode_feature(lay, name, columns.get(name), n)
            out[f"{entity}_multi"] = idx
            out[f"{entity}_multi_w"] = w
        if lay.num:
            out[f"{entity}_num"] = nums.encode(columns, n)
        return out

    @functools.cached_property
    def _encoders(self) -> dict[str, tuple[_Categoricals, _Numerics]]:
        """Per entity: its categorical and its numeric columns' encoders (built once)."""
        out = {}
        for e, lay in self._layouts.items():
            cats = _Categoricals.of([self.by_name(name) for name in lay.cat], lay.offsets)
            out[e] = (cats, _Numerics.of([self.by_name(name) for name in lay.num]))
        return out

    def encode_feature(self, name: str, values: Any, n: int) -> tuple[np.ndarray, ...]:
        """One feature's share of its entity's encoded groups, for ``n`` rows.

        ``(index [n],)`` for a categorical, ``(index [n, L], weight [n, L])`` for a
        multi-categorical (L = the entity's ``max_len``) and ``(value [n],)`` for a numeric: the
        values :meth:`encode_entity` writes at the feature's :meth:`slot`. A feature store uses
        it to encode a stored column once, and to apply a request's value over a stored row.
        """
        f = self.by_name(name)
        try:
            return self._encode_feature(self.layout(f.entity), name, values, n)
        except FeatureError as e:
            e.entity = f.entity
            raise

    def _encode_feature(
        self, lay: EntityLayout, name: str, values: Any, n: int
    ) -> tuple[np.ndarray, ...]:
        f = self.by_name(name)
        if f.kind == "categorical":
            return (_Categoricals.of([f], lay.offsets).encode({name: values}, n)[:, 0],)
        if f.kind == "numeric":
            return (_Numerics.of([f]).encode({name: values}, n)[:, 0],)
        fi, fw = _encode_multi(f, values, n)
        idx = np.zeros((n, lay.max_len), dtype=np.int64)
        w = np.zeros((n, lay.max_len), dtype=np.float32)
        idx[:, : f.max_len] = (lay.offsets[name] + fi) * (fw > 0)  # padding slots point at 0
        w[:, : f.max_len] = fw
        return idx, w

    def slot(self, name: str) -> tuple[tuple[str, ...], int]:
        """Where :meth:`encode_feature`'s arrays go: (input names, in order; the column index)."""
        f = self.by_name(name)
        e, lay = f.entity, self.layout(f.entity)
        if f.kind == "categorical":
            return (f"{e}_cat",), lay.cat.index(name)
        if f.kind == "numeric":
            return (f"{e}_num",), lay.num.index(name)
        return (f"{e}_multi", f"{e}_multi_w"), lay.multi.index(name)

    @functools.cached_property
    def digest(self) -> str:
        """A short content hash: two schemas with equal digests encode every value alike."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def encode(
        self,
        user: Mapping[str, Any],
        context: Mapping[str, Any] | None,
        item_columns: Mapping[str, Any],
        n_items: int,
    ) -> dict[str, np.ndarray]:
        """Encode one request: one user, one context, ``n_items`` candidates (columnar)."""
        out = self.encode_entity("user", {k: [v] for k, v in user.items()}, 1)
        out.update(self.encode_entity("context", {k: [v] for k, v in (context or {}).items()}, 1))
        out.update(self.encode_entity("item", item_columns, n_items))
        return out

    def encode_rows(self, columns: Mapping[str, Any], n: int) -> dict[str, np.ndarray]:
        """Encode a batch where every entity has ``n`` rows (training and offline scoring)."""
        out: dict[str, np.ndarray] = {}
        for e in ENTITIES:
            out.update(self.encode_entity(e, columns, n))
        return out


# -- hashing ---------------------------------------------------------------------------------
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a cheap, well-distributed, platform-independent 64-bit mix."""
    z = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):  # in place: a few ufunc calls, no temporaries
        z += np.uint64(0x9E3779B97F4A7C15)
        z ^= z >> np.uint64(30)
        z *= _M1
        z ^= z >> np.uint64(27)
        z *= _M2
        z ^= z >> np.uint64(31)
    return z


_MASK64 = 0xFFFFFFFFFFFFFFFF


def _str_key(s: str) -> int:
    """A stable 64-bit key for a string; a string of ASCII digits keys as the integer it spells.

    Only ASCII digits: ``int()`` also reads other scripts' digits ("٣" is 3) and ``isdigit()``
    accepts superscripts it cannot read ("³"); both are ordinary strings here.
    """
    t = s.strip()
    digits = t[1:] if t.startswith("-") else t
    if 0 < len(digits) < 19 and digits.isascii() and digits.isdigit():
        return int(t) & _MASK64
    data = t.encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def _check_lengths(f: Feature, values: Sequence[str], first_row: int = 0) -> None:
    """FeatureError naming the first row whose string is longer than MAX_STRING_CHARS."""
    for i, v in enumerate(values):
        if len(v) > MAX_STRING_CHARS:
            raise FeatureError(
                f.name,
                f"string of {len(v)} characters; at most {MAX_STRING_CHARS} are accepted",
                row=first_row + i,
            )


class _StringCache:
    """Keys computed once per distinct string, kept for strings of <= CACHE_KEY_CHARS.

    A string's value is its 64-bit keys packed little-endian (8 bytes per key), so a column's
    values join into one buffer that numpy reads as uint64 without a conversion per value. A
    column is looked up whole by one C-level ``map`` over a dict, so a column of strings seen
    before runs no Python per value; ``compute`` runs (once per column) only for the strings new
    to the cache. The dict holds at most ``max_entries`` entries, the oldest leaving first, and
    the module derives ``max_entries`` from a byte budget and the largest entry, so whatever
    clients send, the cache holds at most that many bytes.
    """

    def __init__(self, compute: Callable[[Feature, list[str]], list[bytes]], max_entries: int):
        self._compute = compute
        self.max_entries = max_entries
        self._data: dict[str, bytes] = {}
        self._lock = threading.Lock()  # requests encode on several threads

    def __len__(self) -> int:
        return len(self._data)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def known(self, column: Sequence[Any]) -> list[bytes] | None:
        """The values of a column whose every value is a cached string, else None.

        No type check is needed: only a string (or a str subclass, which keys alike) equals a
        cached string, and a cached string is one short enough to have been cached.
        """
        try:
            return list(map(self._data.__getitem__, column))
        except (KeyError, TypeError):  # a string new to the cache, or not a string at all
            return None

    def values(self, f: Feature, strings: Sequence[str], first_row: int = 0) -> list[bytes]:
        """The value of every string, in order; FeatureError naming a row whose string is long."""
        if (known := self.known(strings)) is not None:
            return known
        found = dict(zip(strings, map(self._data.get, strings), strict=True))  # None: new
        new = [s for s, v in found.items() if v is None]
        if max(map(len, new)) > MAX_STRING_CHARS:  # known strings are short: a new one is long
            _check_lengths(f, strings, first_row)  # raises, naming the first such row
        found.update(zip(new, self._compute(f, new), strict=True))
        table = cast("dict[str, bytes]", found)  # every string has its value now
        self._learn({s: table[s] for s in new if len(s) <= CACHE_KEY_CHARS})
        return list(map(table.__getitem__, strings))

    def _learn(self, fresh: dict[str, bytes]) -> None:
        """Add ``fresh``, dropping the oldest entries so that at most max_entries remain."""
        with self._lock:
            keep = list(fresh.items())[-self.max_entries :]
            drop = len(self._data) + len(keep) - self.max_entries
            for s in list(itertools.islice(self._data, max(drop, 0))):
                del self._data[s]
            self._data.update(keep)


# The largest entry a cache can hold: a key of CACHE_KEY_CHARS 4-byte characters, its value, and
# the dict's own cost per entry (an entry of 24 bytes and index slots, at most 3x oversized right
# after the dict grows: well under 200 bytes).
_WIDEST_KEY = sys.getsizeof("\U0010ffff" * CACHE_KEY_CHARS)
_DICT_ENTRY_BYTES = 200
_MAX_TOKENS = CACHE_KEY_CHARS // 2 + 1  # "1,2,3,...": the most tokens a cached string holds
_KEY_ENTRY_BYTES = _WIDEST_KEY + sys.getsizeof(bytes(8)) + _DICT_ENTRY_BYTES
_TOKEN_ENTRY_BYTES = _WIDEST_KEY + sys.getsizeof(bytes(8 * _MAX_TOKENS)) + _DICT_ENTRY_BYTES


def _packed(keys: Iterable[int]) -> bytes:
    """64-bit keys as the cache keeps them: 8 bytes each, little-endian."""
    return b"".join(k.to_bytes(8, "little") for k in keys)


def _unpacked(data: bytes) -> np.ndarray:
    """Packed keys as a (writable, native) uint64 array."""
    return np.frombuffer(data, dtype="<u8").astype(np.uint64)


# Cached: ids and tag strings repeat across requests, and blake2b per value would dominate.
_KEYS = _StringCache(
    lambda f, strings: [k.to_bytes(8, "little") for k in map(_str_key, strings)],
    KEY_CACHE_BYTES // _KEY_ENTRY_BYTES,
)


def _text(cache: _StringCache, f: Feature, values: Any) -> list[bytes] | None:
    """The cache's values for a text column (every value a ``str``), else None."""
    if isinstance(values, np.ndarray):
        if values.ndim != 1 or values.dtype.kind not in "UO":
            return None
        values = values.tolist()
    if not isinstance(values, list) or not values or type(values[0]) is not str:
        return None
    if (known := cache.known(values)) is not None:  # the common case: no check per value
        return known
    return cache.values(f, values) if set(map(type, values)) == {str} else None


# id_keys reads ids through the categorical path of a feature like this one.
_ID_FEATURE = Feature("id", "item", "categorical", buckets=1)


def _bucket(keys: np.ndarray, buckets: int | np.ndarray) -> np.ndarray:
    """Bucket ids (int64) of keys: ``buckets`` is one count, or one per column of ``keys``."""
    return (_mix64(keys) % np.asarray(buckets, dtype=np.uint64)).astype(np.int64)


def _text_keys(f: Feature, values: Any, n: int) -> np.ndarray | None:
    """Keys [n] (uint64) of a text column, else None."""
    if (packed := _text(_KEYS, f, values)) is None:
        return None
    if len(packed) != n:
        raise FeatureError(f.name, f"expected {n} values, got shape ({len(packed)},)")
    return _unpacked(b"".join(packed))


def id_keys(values: Any) -> np.ndarray:
    """The 64-bit keys [n] (uint64) the encoder hashes for ids, so 42 and "42" share a key.

    Feature stores index rows by these keys: any spelling of an id that the encoder treats as
    the same value finds the same stored row. Integers (and strings of ASCII digits that spell
    one) key as the integer, other strings through blake2b. Raises ``FeatureError`` for other
    types and for strings longer than MAX_STRING_CHARS.
    """
    f = _ID_FEATURE
    if isinstance(values, np.ndarray) and values.dtype.kind in "iu":
        return values.astype(np.int64).view(np.uint64)
    if (keys := _text_keys(f, values, len(values))) is not None:
        return keys
    arr = _as_array(f, values, len(values))
    if arr.dtype.kind in "iu":
        return arr.astype(np.int64).view(np.uint64)
    keys = np.empty(len(arr), dtype=np.uint64)
    for i, v in enumerate(arr.astype(object)):
        if not isinstance(v, str | int | np.integer) or isinstance(v, bool | np.bool_):
            raise FeatureError("id", f"expected a string or integer id, got {v!r}", row=i)
        keys[i] = _key_of(f, v, i)
    return keys


def _key_of(f: Feature, v: Any, row: int) -> int:
    """Slow path for one object value (mixed-type columns)."""
    if v is None:
        v = f.default if f.default is not None else ""
    if isinstance(v, bool | np.bool_):
        raise FeatureError(f.name, "expected a string or integer, got a boolean", row=row)
    if isinstance(v, int | np.integer):
        return int(v) & _MASK64
    if isinstance(v, float | np.floating):
        if not math.isfinite(v) or v != int(v):
            raise FeatureError(f.name, f"expected a string or integer, got {v!r}", row=row)
        return int(v) & _MASK64
    if isinstance(v, str):
        return int.from_bytes(_KEYS.values(f, [v], row)[0], "little")
    raise FeatureError(f.name, f"expected a string or integer, got {type(v).__name__}", row=row)


def _column_keys(f: Feature, values: Any, n: int) -> np.ndarray:
    """Keys [n] (uint64) of one categorical column; vectorised for homogeneous columns."""
    if values is None:  # absent column: one default, broadcast
        return np.full(n, _key_of(f, None, 0), dtype=np.uint64)
    if (keys := _text_keys(f, values, n)) is not None:
        return keys
    arr = _as_array(f, values, n)
    kind = arr.dtype.kind
    if kind == "b":
        raise FeatureError(f.name, "expected strings or integers, got booleans")
    if kind in "iu":
        return arr.astype(np.int64).view(np.uint64)
    if kind == "f":
        bad = ~np.isfinite(arr) | (arr != np.round(arr))
        if bad.any():
            row = int(np.argmax(bad))
            raise FeatureError(f.name, f"expected a string or integer, got {arr[row]!r}", row=row)
        return arr.astype(np.int64).view(np.uint64)
    objects = arr.astype(object)  # mixed types (or bytes): per value
    return np.fromiter((_key_of(f, v, i) for i, v in enumerate(objects)), np.uint64, count=n)


@dataclass(frozen=True, eq=False)
class _Categoricals:
    """Categorical features of one entity, bucketed together: one hash pass for all columns."""

    feats: tuple[Feature, ...]
    buckets: np.ndarray  # uint64 [k]
    offsets: np.ndarray  # int64 [k]: the first row of each feature in the entity's table

    @classmethod
    def of(cls, feats: Sequence[Feature], offsets: Mapping[str, int]) -> _Categoricals:
        buckets = np.array([f.buckets for f in feats], dtype=np.uint64)
        return cls(tuple(feats), buckets, np.array([offsets[f.name] for f in feats], np.int64))

    def encode(self, columns: Mapping[str, Any], n: int) -> np.ndarray:
        """Embedding rows [n, k] (int64) of the columns (an absent one takes its default)."""
        keys = np.empty((n, len(self.feats)), dtype=np.uint64)
        for j, f in enumerate(self.feats):
            keys[:, j] = _column_keys(f, columns.get(f.name), n)
        return _bucket(keys, self.buckets) + self.offsets


def _as_array(f: Feature, values: Any, n: int) -> np.ndarray:
    """A 1-D array of the column: int64 for all-int lists (the common, vectorised case)."""
    if isinstance(values, np.ndarray):
        arr = values
    else:
        seq = values if isinstance(values, list) else list(values)
        try:
            if set(map(type, seq)) != {int}:
                raise TypeError
            arr = np.array(seq, dtype=np.int64)
        except (TypeError, OverflowError):  # mixed types, or ids beyond int64: per value
            arr = _object_1d(seq)
    if arr.ndim != 1 or len(arr) != n:
        raise FeatureError(f.name, f"expected {n} values, got shape {arr.shape}")
    return arr


# -- multi-categorical -----------------------------------------------------------------------
def _str_tokens(f: Feature, strings: list[str]) -> list[bytes]:
    """Packed keys of comma-separated strings such as KuaiRand's tag "12,65" (blanks skipped)."""
    parts = [[p for p in s.split(",") if p.strip()] for s in strings]
    keys = iter(_KEYS.values(f, list(itertools.chain.from_iterable(parts))))
    return [b"".join(itertools.islice(keys, len(p))) for p in parts]


_TOKENS = _StringCache(_str_tokens, TOKEN_CACHE_BYTES // _TOKEN_ENTRY_BYTES)


def _tokens(f: Feature, v: Any, row: int) -> bytes:
    """Keys of one value of a mixed column: a tag string, a list of values or None."""
    if v is None:
        v = f.default if f.default is not None else ""
    if isinstance(v, str):
        return _TOKENS.values(f, [v], row)[0]
    if isinstance(v, list | tuple | np.ndarray):
        return _packed(_key_of(f, p, row) for p in list(v)[: f.max_len])
    raise FeatureError(f.name, "expected a list or a comma-separated string", row=row)


def _encode_multi(f: Feature, values: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(bucket ids [n, max_len], mean-pooling weights [n, max_len]) for one list column."""
    if values is None:  # absent column: one default row, broadcast
        ids, w = _encode_multi(f, [None], 1)
        return np.repeat(ids, n, axis=0), np.repeat(w, n, axis=0)
    if (text := _text(_TOKENS, f, values)) is not None:
        rows = text
    else:
        seq = values.tolist() if isinstance(values, np.ndarray) and values.ndim == 1 else values
        seq = seq if isinstance(seq, list) else list(seq)
        rows = [_tokens(f, v, i) for i, v in enumerate(seq)]
    if len(rows) != n:
        raise FeatureError(f.name, f"expected {n} values, got {len(rows)}")
    tok, cnt = _pad(rows, f.max_len)
    present = np.arange(f.max_len)[None, :] < cnt[:, None]
    w = np.where(present, 1.0 / np.maximum(cnt, 1)[:, None], 0.0).astype(np.float32)
    return _bucket(tok, f.buckets), w  # padding slots: weight 0 (the caller zeroes their ids)


def _object_1d(values: Any) -> np.ndarray:
    """A 1-D object array whose elements may themselves be lists (np.asarray would nest them)."""
    seq = values if isinstance(values, list) else list(values)
    return np.fromiter(seq, dtype=object, count=len(seq))


def _pad(rows: Sequence[bytes], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``max_len`` keys of each row, zero-padded into [len(rows), max_len]; counts."""
    cnt = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows)) // 8
    flat = _unpacked(b"".join(rows))
    if (cnt > max_len).any():  # keep each row's first max_len keys
        col = np.arange(len(flat)) - np.repeat(np.cumsum(cnt) - cnt, cnt)
        flat, cnt = flat[col < max_len], np.minimum(cnt, max_len)
    tok = np.zeros((len(rows), max_len), dtype=np.uint64)
    tok[np.arange(max_len)[None, :] < cnt[:, None]] = flat  # row-major, as flat is
    return tok, cnt


# -- numerics --------------------------------------------------------------------------------
def _to_float(f: Feature, values: Any, n: int) -> np.ndarray:
    """float64 [n]; None -> the default (inf marks "no default: the training mean")."""
    if isinstance(values, np.ndarray):
        arr = values
    else:
        seq = values if isinstance(values, list) else list(values)
        numbers = set(map(type, seq)) <= {int, float}
        try:
            arr = np.array(seq, dtype=np.float64) if numbers else _object_1d(seq)
        except OverflowError:  # an int beyond float range: the per-value path names its row
            arr = _object_1d(seq)
    if arr.dtype.kind in "iuf":
        x = arr.astype(np.float64, copy=False)
    elif arr.dtype.kind == "O":
        x = np.empty(len(arr), dtype=np.float64)
        for i, v in enumerate(arr):
            if v is None:
                x[i] = np.inf if f.default is None else float(f.default)
            elif isinstance(v, bool | np.bool_):
                raise FeatureError(f.name, "expected a number, got a boolean", row=i)
            elif isinstance(v, int | float | np.integer | np.floating):
                try:
                    x[i] = float(v)
                except OverflowError:  # an int beyond float range
                    x[i] = math.inf
                if not math.isfinite(x[i]):
                    raise FeatureError(f.name, f"must be a finite number, got {v!r}", row=i)
            else:
                raise FeatureError(f.name, f"expected a number, got {type(v).__name__}", row=i)
        return x
    else:
        raise FeatureError(f.name, f"expected numbers, got {arr.dtype}")
    if x.ndim != 1 or len(x) != n:
        raise FeatureError(f.name, f"expected {n} values, got shape {x.shape}")
    bad = ~np.isfinite(x)
    if bad.any():
        row = int(np.argmax(bad))
        raise FeatureError(f.name, f"must be a finite number, got {x[row]!r}", row=row)
    return x


def _log1p(x: np.ndarray) -> np.ndarray:
    return np.log1p(np.maximum(x, 0.0))  # counts/durations: negatives are clipped to 0


def _apply_transform(f: Feature, x: np.ndarray) -> np.ndarray:
    return _log1p(x) if f.transform == "log1p" else x


def _numeric_column(f: Feature, values: Any, n: int) -> np.ndarray:
    """float64 [n]; inf marks "the training mean" (no value and no default)."""
    if values is None:
        return np.full(n, np.inf if f.default is None else float(f.default))
    return _to_float(f, values, n)


@dataclass(frozen=True, eq=False)
class _Numerics:
    """Numeric features of one entity, standardised together: one pass for all columns."""

    feats: tuple[Feature, ...]
    mean: np.ndarray  # float64 [k]
    std: np.ndarray  # float64 [k]
    logs: list[int]  # the columns transformed by log1p

    @classmethod
    def of(cls, feats: Sequence[Feature]) -> _Numerics:
        logs = [j for j, f in enumerate(feats) if f.transform == "log1p"]
        mean, std = np.array([f.mean for f in feats]), np.array([f.std for f in feats])
        return cls(tuple(feats), mean, std, logs)

    def encode(self, columns: Mapping[str, Any], n: int) -> np.ndarray:
        """Transformed, standardised and clipped values [n, k] (float32)."""
        x = np.empty((n, len(self.feats)), dtype=np.float64)
        for j, f in enumerate(self.feats):
            x[:, j] = _numeric_column(f, columns.get(f.name), n)
        missing = np.isinf(x)
        x[missing] = 0.0
        x[:, self.logs] = _log1p(x[:, self.logs])
        z = (x - self.mean) / self.std
        z[missing] = 0.0  # the training mean, standardised
        return np.clip(z, -NUMERIC_CLIP, NUMERIC_CLIP).astype(np.float32)


# -- the default schema ----------------------------------------------------------------------
def default_schema() -> FeatureSchema:
    """The schema the demo model uses; it follows KuaiRand's columns (see docs/internals.md)."""

    def cat(name: str, entity: Entity, buckets: int, default: str | int = 0) -> Feature:
        return Feature(name, entity, "categorical", buckets=buckets, default=default)

    def num(name: str, entity: Entity, transform: str = "log1p") -> Feature:
        return Feature(name, entity, "numeric", transform=transform)

    return FeatureSchema(
        (
            cat("user_id", "user", 100_003),
            cat("user_active_degree", "user", 31, "UNKNOWN"),
            cat("is_video_author", "user", 7),
            num("follow_user_num", "user"),
            num("fans_user_num", "user"),
            num("register_days", "user"),
            cat("hour", "context", 29, 12),
            cat("day_of_week", "context", 11, 0),
            cat("tab", "context", 31, 0),
            cat("video_id", "item", 100_003),
            cat("author_id", "item", 50_021),
            cat("video_type", "item", 7, "NORMAL"),
            cat("music_id", "item", 20_011),
            Feature("tag", "item", "multi_categorical", buckets=1_009, max_len=4, default=""),
            num("duration_s", "item"),
            num("upload_age_days", "item"),
        )
    )
