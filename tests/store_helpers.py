"""Helpers for the feature-store tests: request bodies by id, or with the stored values sent.

The "full" body sends, for the same ids, exactly the values the snapshot holds, so ranking by
ids with stored features must give the very same response items.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from model.core.features import id_keys
from model.core.store.snapshot import EntityTable, build_tables


def stored_rows(table: EntityTable, ids: list[Any]) -> list[dict[str, Any]]:
    """The stored feature values (JSON-native) of ``ids``, {} for an id the table lacks."""
    rows, found = table.lookup(id_keys(ids))
    cols = {c: table.columns[c].take(np.minimum(rows, table.rows - 1)).tolist()
            for c in table.feature_columns}  # fmt: skip
    return [
        {c: cols[c][i] for c in table.feature_columns} if found[i] else {} for i in range(len(ids))
    ]


def ids_body(user_id: Any, video_ids: list[Any], **extra: Any) -> dict[str, Any]:
    """A /rank request by ids only."""
    body: dict[str, Any] = {
        "user": {"user_id": user_id},
        "context": {"hour": 20, "day_of_week": 3, "tab": 1},
        "candidates": [{"video_id": v} for v in video_ids],
    }
    return {**body, **extra}


def full_body(tables: Mapping[str, EntityTable], user_id: Any, video_ids: list[Any]) -> dict:
    """The same request sending every stored feature value of the user and the candidates."""
    body = ids_body(user_id, video_ids)
    body["user"]["features"] = stored_rows(tables["user"], [user_id])[0]
    rows = stored_rows(tables["item"], video_ids)
    body["candidates"] = [
        {"video_id": v, "features": f} for v, f in zip(video_ids, rows, strict=True)
    ]
    return body


def items_of(response: Mapping[str, Any]) -> list[tuple[Any, float, dict[str, float]]]:
    """What a ranking answer says about the candidates (order, scores, predictions)."""
    return [(it["video_id"], it["score"], it["predictions"]) for it in response["items"]]


def shifted_tables(tables: Mapping[str, EntityTable]) -> dict[str, EntityTable]:
    """The same ids with other values (longer, older, other tags): a second snapshot whose
    scores differ for every candidate."""
    columns: dict[str, dict[str, Any]] = {}
    for entity, table in tables.items():
        columns[entity] = {c: table.columns[c].take() for c in table.columns}
    items = columns["item"]
    items["duration_s"] = items["duration_s"] * 7.0 + 60.0
    items["upload_age_days"] = items["upload_age_days"] + 400.0
    items["tag"] = np.array(["1,2,3"] * len(items["tag"]), dtype=object)
    columns["user"]["register_days"] = columns["user"]["register_days"] + 1000.0
    for entity in columns:
        for c, v in columns[entity].items():
            if v.dtype.kind == "U":
                columns[entity][c] = v.astype(object)
    return build_tables(columns)
