"""Features by id on the request path: what one /rank request reads from the feature store.

A :class:`FeatureView` is immutable and lives in the reconciler's ``ServingState`` next to the
model versions it was prepared for, so a request reads one state and gets a model and the
features prepared for that model from one snapshot - never a mix (service/rollout/feature_source.py
builds the views; the reconciler swaps them). Per request:

- no store (``off``, or no snapshot published yet): the request's features and schema defaults;
- embedded: stored rows gathered by id from the snapshot encoded for this model's schema
  (``EncodedSnapshot.assemble``), the request's values written over them;
- Redis: one pipelined round trip for the user and all candidates, rows decoded and merged under
  the request's values, then encoded like a request that sent them.

A store that fails (down, timed out, garbage) degrades the answer: the request is scored with
its own features and defaults, ``degraded`` names the feature store and a metric counts the
reason; with ``VIDRANK_FEATURE_STORE_REQUIRED`` it raises ``StoreUnavailable`` (503) instead.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from model.core.features import FeatureError, FeatureSchema, id_keys
from model.core.store.encoded import EncodedSnapshot, lacks
from model.core.store.redis_store import RedisReader, StoreUnavailable, decode_rows
from model.core.store.snapshot import ENTITY_IDS, Snapshot
from service import metrics
from service.scoring.request import EncoderInput
from service.scoring.scorer import Scorer

DEGRADED = ("feature_store",)  # what a degraded response names


@dataclass(frozen=True, slots=True)
class Encoded:
    """A request's model inputs, the snapshot they came from and why the store was not used."""

    inputs: dict[str, np.ndarray]
    snapshot: str | None = None
    degraded: str | None = None  # a reason (metric label) when the store could not answer


def plain(schema: FeatureSchema, given: EncoderInput) -> dict[str, np.ndarray]:
    """The request's own features, schema defaults for the rest (no store)."""
    return schema.encode(given.user, given.context, given.items, given.n)


def _context(schema: FeatureSchema, given: EncoderInput) -> dict[str, np.ndarray]:
    return schema.encode_entity("context", {k: [v] for k, v in given.context.items()}, 1)


@dataclass(frozen=True, eq=False)
class FeatureView:
    """No store: every request is scored with its own features (the base of the other views)."""

    backend: str = "off"
    required: bool = False
    reason: str | None = None  # set when the store is configured but cannot serve

    @property
    def snapshot(self) -> str | None:
        return None

    def encode(self, scorer: Scorer, given: EncoderInput) -> Encoded:
        if self.reason is not None or self.required:  # a required store has nothing to serve
            reason = self.reason or "no_snapshot"
            return self.degrade(scorer, given, reason, "no feature snapshot is loaded")
        return Encoded(plain(scorer.schema, given))

    def degrade(self, scorer: Scorer, given: EncoderInput, reason: str, message: str) -> Encoded:
        """The request without stored features (or a 503 when the store is required)."""
        metrics.FEATURE_STORE_ERRORS.labels(reason).inc()
        if self.required:
            raise StoreUnavailable(reason, message)
        return Encoded(plain(scorer.schema, given), self.snapshot, reason)

    def lacks(self, schema: FeatureSchema) -> tuple[str, ...]:
        """Features of ``schema`` this store does not hold (none when there is no store)."""
        return ()

    def describe(self, scorers: Mapping[str, Scorer]) -> dict[str, Any]:
        """For /models and admin answers: backend, snapshot, state and per-version lacks."""
        return {
            "backend": self.backend,
            "snapshot": self.snapshot,
            "required": self.required,
            "status": "ok" if self.reason is None else f"degraded: {self.reason}",
            "lacks": {v: list(self.lacks(s.schema)) for v, s in scorers.items()},
        }


@dataclass(frozen=True, eq=False)
class EmbeddedView(FeatureView):
    """A snapshot from the registry, encoded for each served schema (keyed by schema digest)."""

    data: Snapshot | None = None
    prepared: Mapping[str, EncodedSnapshot] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.data.name if self.data is not None else ""

    @property
    def columns(self) -> dict[str, tuple[str, ...]]:
        return {e: self.data.columns(e) for e in ENTITY_IDS} if self.data is not None else {}

    @property
    def snapshot(self) -> str | None:
        return self.name

    def lacks(self, schema: FeatureSchema) -> tuple[str, ...]:
        return lacks(schema, self.columns)

    def encode(self, scorer: Scorer, given: EncoderInput) -> Encoded:
        enc = self.prepared.get(scorer.schema.digest)
        if enc is None:  # cannot happen for a state the reconciler built; never a 500 either
            return self.degrade(scorer, given, "unprepared", "snapshot not prepared for model")
        start = time.perf_counter()
        user = {k: [v] for k, v in given.user.items()}
        user_in, user_miss = enc.assemble("user", [given.user["user_id"]], user, 1)
        item_in, item_miss = enc.assemble("item", given.video_ids, given.items, given.n)
        metrics.FEATURE_LOOKUP_SECONDS.observe(time.perf_counter() - start)
        count_misses(user_miss, item_miss)
        return Encoded({**user_in, **_context(scorer.schema, given), **item_in}, self.name)


@dataclass(frozen=True, eq=False)
class RedisView(FeatureView):
    """The active snapshot in Redis (``name`` None: none known yet, ``reason`` says why)."""

    reader: RedisReader | None = None
    name: str | None = None
    columns: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def snapshot(self) -> str | None:
        return self.name

    def lacks(self, schema: FeatureSchema) -> tuple[str, ...]:
        return lacks(schema, self.columns) if self.name is not None else ()

    def encode(self, scorer: Scorer, given: EncoderInput) -> Encoded:
        if self.name is None or self.reader is None:
            return self.degrade(scorer, given, self.reason or "no_snapshot", "no active snapshot")
        start = time.perf_counter()
        try:
            user_key = int(id_keys([given.user["user_id"]])[0])
            item_keys = id_keys(given.video_ids)
            user_raw, items_raw = self.reader.fetch(self.name, user_key, item_keys)
            (user_row,) = decode_rows([user_raw], len(self.columns["user"]))
            item_rows = decode_rows(items_raw, len(self.columns["item"]))
        except StoreUnavailable as e:
            return self.degrade(scorer, given, e.reason, e.message)
        metrics.FEATURE_LOOKUP_SECONDS.observe(time.perf_counter() - start)
        user = merge_user(self.columns["user"], user_row, given.user)
        items = merge_items(self.columns["item"], item_rows, given.items, scorer.view.item)
        try:
            inputs = scorer.schema.encode(user, given.context, items, given.n)
        except FeatureError as e:
            if _sent_by_request(e, given):
                raise  # the request's own value: a 422 naming its field
            return self.degrade(scorer, given, "garbage", f"stored value rejected: {e}")
        count_misses(int(user_row is None), item_rows.count(None))
        return Encoded(inputs, self.name)


def merge_user(
    columns: tuple[str, ...], row: list[Any] | None, given: Mapping[str, Any]
) -> dict[str, Any]:
    """The stored user row under the request's values (a value of None is "not sent")."""
    out = dict(zip(columns, row, strict=True)) if row is not None else {}
    out.update({k: v for k, v in given.items() if v is not None})
    return out


def merge_items(
    columns: tuple[str, ...],
    rows: list[list[Any] | None],
    given: Mapping[str, list[Any]],
    known: frozenset[str],
) -> dict[str, list[Any]]:
    """Stored item columns (None for unknown ids) under the request's columns."""
    out: dict[str, list[Any]] = dict(given)
    present = [r for r in rows if r is not None]
    if not present:
        return out
    width = len(columns)
    padded = rows if len(present) == len(rows) else [r or [None] * width for r in rows]
    for name, stored in zip(columns, zip(*padded, strict=True), strict=True):
        if name not in known:
            continue
        sent = given.get(name)
        if sent is None:
            out[name] = list(stored)
        elif None in sent:
            out[name] = [s if v is None else v for v, s in zip(sent, stored, strict=True)]
    return out


def _sent_by_request(e: FeatureError, given: EncoderInput) -> bool:
    if e.entity == "user":
        return given.user.get(e.feature) is not None
    if e.entity == "item":
        col = given.items.get(e.feature)
        return col is not None and (e.row is None or col[e.row] is not None)
    return True  # context is never stored


def count_misses(user: int, items: int) -> None:
    """Ids the snapshot does not hold (served with schema defaults)."""
    if user:
        metrics.FEATURE_MISSES.labels("user").inc(user)
    if items:
        metrics.FEATURE_MISSES.labels("item").inc(items)
