"""A /rank body as encoder input: parsed once, checked for structure, with precise field paths.

This module owns the way from bytes to what the feature encoder takes: the user row, the context
row, one column per item feature, the video ids, the feature names the model does not know, and
the request field any error points at. The body is parsed once by orjson. Structure is validated
with set operations and one list comprehension per feature (C-level loops), never with a Python
object per candidate or per feature value; when a check fails, a slow path walks the input to
name the exact field (``candidates[3].features.duration_s``). Feature *values* are coerced and
checked only by the encoder (``model/core/features.py``); its :class:`FeatureError` names entity,
feature and row, which :meth:`RankRequest.field_of` turns into the request's field path.

Two candidate layouts give identical results:

- rows:     ``"candidates": [{"video_id": 1, "features": {"duration_s": 12.5}}, ...]``
- columnar: ``"candidates": {"video_id": [1, ...], "features": {"duration_s": [12.5, ...]}}``
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from model.core.errors import shown
from model.core.features import MAX_STRING_CHARS, FeatureError, FeatureSchema
from service.errors import InvalidRequest, MalformedBody

REQUEST_KEYS = frozenset(
    {"request_id", "user", "context", "candidates", "fusion", "top_k", "explain"}
)
USER_KEYS = frozenset({"user_id", "features"})
CANDIDATE_KEYS = frozenset({"video_id", "features"})
MAX_REQUEST_ID_LEN = 128  # also the X-Request-ID header's limit; both are echoed in a header
MAX_ID_CHARS = MAX_STRING_CHARS  # user_id and video_id strings, like every encoded string
_EMPTY: dict[str, Any] = {}
_ID_TYPES = frozenset({str, int})
_ID_RULE = f"must be an integer or a string of at most {MAX_ID_CHARS} characters"


@dataclass(frozen=True)
class SchemaView:
    """What the request path needs to know about a version's feature schema, precomputed once."""

    user: frozenset[str]
    context: frozenset[str]
    item: frozenset[str]
    item_columns: tuple[str, ...]  # item features other than video_id, in schema order

    @classmethod
    def of(cls, schema: FeatureSchema) -> SchemaView:
        item = schema.names("item")
        return cls(
            user=frozenset(schema.names("user")),
            context=frozenset(schema.names("context")),
            item=frozenset(item),
            item_columns=tuple(n for n in item if n != "video_id"),
        )


@dataclass(slots=True)
class RankRequest:
    """A structurally valid /rank request (feature values are checked when encoded)."""

    request_id: str | None
    user_id: str | int
    user: dict[str, Any]  # user features, including user_id
    context: dict[str, Any]
    candidates: list[Any] | dict[str, Any]
    columnar: bool
    n: int
    fusion: Any
    top_k: int | None
    explain: bool = False  # add each task's contribution to every item's score

    def field_of(self, e: FeatureError) -> str:
        """The request field a FeatureError from the encoder points at."""
        if e.entity == "user":
            return "user.user_id" if e.feature == "user_id" else f"user.features.{e.feature}"
        if e.entity == "context":
            return f"context.{e.feature}"
        feature = "video_id" if e.feature == "video_id" else f"features.{e.feature}"
        if self.columnar:
            base = f"candidates.{feature}"
            return base if e.row is None else f"{base}[{e.row}]"
        return f"candidates[{'*' if e.row is None else e.row}].{feature}"


@dataclass(slots=True)
class EncoderInput:
    """A request as the feature encoder takes it, plus what the model does not know."""

    user: dict[str, Any]
    context: dict[str, Any]
    items: dict[str, Any]  # one column (list of n values) per item feature the schema has
    n: int
    video_ids: list[Any]  # in request order
    unknown: set[str]  # feature names, of any entity, the schema does not have


# No control character - C0 (CR, LF, NUL ...), DEL, C1 (NEL U+0085 ...) - no line or paragraph
# separator (U+2028/9) and no space at either end: what any HTTP layer accepts in a header value
# (characters beyond Latin-1 are sent as "?") and what a log reader will not take for a line end.
_ID_CHAR = r"[^\x00-\x1f\x7f-\x9f\u2028\u2029"
REQUEST_ID_PATTERN = rf"^{_ID_CHAR} ]({_ID_CHAR}]*{_ID_CHAR} ])?$"
_REQUEST_ID = re.compile(REQUEST_ID_PATTERN)


def valid_request_id(rid: str) -> bool:
    """A request id that can be echoed in the ``x-request-id`` header.

    1-128 characters matching REQUEST_ID_PATTERN. The same rule for the header and the body's
    ``request_id``: a CR/LF or another control character (or, for h11, an edge space) made the
    HTTP layer refuse the response after the request was served, dropping the connection.
    """
    return 0 < len(rid) <= MAX_REQUEST_ID_LEN and _REQUEST_ID.fullmatch(rid) is not None


# -- the body -----------------------------------------------------------------------------------
MAX_DEPTH = 1024  # orjson's nesting limit: a deeper body is a 400, wherever its NaN may be
# The slow path parses with the json module, whose C scanner counts nesting against the
# recursion limit; it must reach past MAX_DEPTH from a request thread's stack.
_PARSE_RECURSION = MAX_DEPTH + 1000


def loads(body: bytes) -> Any:
    """Parse JSON; a NaN/Infinity literal or a number beyond a double's range gets a 422 naming
    the field, not a 400."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as e:
        path = _non_finite_path(body)
        if path is not None:
            raise InvalidRequest("must be a finite number (JSON has no NaN/Infinity)", path) from e
        raise MalformedBody(f"body is not valid JSON: {e}") from None


class _NonFinite:
    pass


_MARKER = _NonFinite()


def _int(text: str) -> int | float | _NonFinite:
    """An integer literal as orjson reads it: beyond 64 bits a double, beyond a double non-finite
    (``int()`` of the 400 digits would be a finite Python int)."""
    if len(text) <= 20:  # at most 19 digits and a sign: int() is exact and cheap
        value: int | float = int(text)
        if -(1 << 63) <= value < 1 << 64:
            return value
    value = float(text)
    return value if math.isfinite(value) else _MARKER


def _non_finite_path(body: bytes) -> str | None:
    """Slow path for a body orjson rejected: the path of a NaN/Infinity literal or an out-of-range
    number, if that is why; None for any other fault. Nesting past MAX_DEPTH is a 400 wherever
    the NaN is, as orjson answers a deep body without one."""
    if sys.getrecursionlimit() < _PARSE_RECURSION:
        sys.setrecursionlimit(_PARSE_RECURSION)
    try:
        doc = json.loads(body, parse_constant=lambda _: _MARKER, parse_int=_int)
    except ValueError:
        return None
    except RecursionError:
        raise _too_deep() from None
    return _find(doc)


def _too_deep() -> MalformedBody:
    return MalformedBody(f"body is not valid JSON: nested deeper than {MAX_DEPTH} levels")


def _find(doc: Any) -> str | None:
    """The path of the first non-finite value in document order (iterative: any depth), or None
    when there is none; MalformedBody when the document nests deeper than MAX_DEPTH."""
    found: str | None = None
    stack: list[tuple[Any, str, int]] = [(doc, "", 0)]
    while stack:
        node, path, depth = stack.pop()
        if found is None and (node is _MARKER or (type(node) is float and not math.isfinite(node))):
            found = shown(path or "$", 256)
        elif isinstance(node, dict | list):
            if depth == MAX_DEPTH:
                raise _too_deep()
            items = node.items() if isinstance(node, dict) else enumerate(node)
            children = [(v, _child(path, k), depth + 1) for k, v in items]
            stack.extend(reversed(children))
    return found


def _child(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def parse_request(body: bytes, max_candidates: int) -> RankRequest:
    """Validate the request's structure (not yet its feature values)."""
    doc = loads(body)
    if type(doc) is not dict:
        raise InvalidRequest("the body must be a JSON object", "$")
    if extra := doc.keys() - REQUEST_KEYS:
        raise InvalidRequest(f"unknown field; expected {sorted(REQUEST_KEYS)}", shown(min(extra)))
    request_id = doc.get("request_id")
    if request_id is not None and (type(request_id) is not str or not valid_request_id(request_id)):
        raise InvalidRequest(
            f"must be a string of 1-{MAX_REQUEST_ID_LEN} characters, without control characters "
            "(C0, DEL, C1), line or paragraph separators, or a space at either end",
            "request_id",
        )
    user_id, user = _user(doc.get("user"))
    context = doc.get("context")
    if context is None:
        context = {}
    elif type(context) is not dict:
        raise InvalidRequest("must be an object of context features", "context")
    candidates, columnar, n = _candidates(doc.get("candidates"), max_candidates)
    top_k = doc.get("top_k")
    if top_k is not None and (type(top_k) is not int or top_k < 1):
        raise InvalidRequest("must be a positive integer", "top_k")
    explain = doc.get("explain", False)
    if type(explain) is not bool:
        raise InvalidRequest("must be true or false", "explain")
    return RankRequest(
        request_id, user_id, user, context, candidates, columnar, n, doc.get("fusion"), top_k,
        explain,
    )  # fmt: skip


def _user(user: Any) -> tuple[str | int, dict[str, Any]]:
    if user is None:
        raise InvalidRequest("is required", "user")
    if type(user) is not dict:
        raise InvalidRequest("must be an object with user_id and features", "user")
    if extra := user.keys() - USER_KEYS:
        raise InvalidRequest(
            "unknown field; expected user_id, features", f"user.{shown(min(extra))}"
        )
    if "user_id" not in user:
        raise InvalidRequest("is required", "user.user_id")
    user_id = user["user_id"]
    if type(user_id) not in _ID_TYPES or (type(user_id) is str and len(user_id) > MAX_ID_CHARS):
        raise InvalidRequest(_ID_RULE, "user.user_id")
    features = user.get("features")
    if features is None:
        features = {}
    elif type(features) is not dict:
        raise InvalidRequest("must be an object of user features", "user.features")
    features = dict(features)
    features["user_id"] = user_id
    return user_id, features


def _candidates(cands: Any, max_candidates: int) -> tuple[list[Any] | dict[str, Any], bool, int]:
    if cands is None:
        raise InvalidRequest("is required", "candidates")
    if type(cands) is list:
        n, columnar = len(cands), False
    elif type(cands) is dict:
        ids = cands.get("video_id")
        if type(ids) is not list:
            raise InvalidRequest("must be a list (columnar candidates)", "candidates.video_id")
        n, columnar = len(ids), True
    else:
        raise InvalidRequest("must be a list of candidates or a columnar object", "candidates")
    if n > max_candidates:
        raise InvalidRequest(f"too many candidates: {n} > {max_candidates}", "candidates")
    return cands, columnar, n


# -- candidates ---------------------------------------------------------------------------------
def encoder_input(req: RankRequest, view: SchemaView) -> EncoderInput:
    """Item columns for the features ``view`` knows; unknown names of every entity collected."""
    if req.columnar:
        assert isinstance(req.candidates, dict)
        ids, columns, unknown = _columnar(req.candidates, req.n, view)
        path: Callable[[int], str] = "candidates.video_id[{}]".format
    else:
        assert isinstance(req.candidates, list)
        ids, columns, unknown = _rows(req.candidates, view)
        path = "candidates[{}].video_id".format
    _check_ids(ids, path)
    if "video_id" in view.item:  # the id is a feature too (hashed like any categorical)
        columns["video_id"] = ids
    unknown |= req.user.keys() - view.user - {"user_id"}
    unknown |= req.context.keys() - view.context
    return EncoderInput(req.user, req.context, columns, req.n, ids, unknown)


def _rows(cands: list[Any], view: SchemaView) -> tuple[list[Any], dict[str, Any], set[str]]:
    if set(map(type, cands)) - {dict}:
        i = next(i for i, c in enumerate(cands) if type(c) is not dict)
        raise InvalidRequest("must be an object with video_id and features", f"candidates[{i}]")
    keys: set[str] = set().union(*cands)
    if extra := keys - CANDIDATE_KEYS:
        bad = min(extra)
        i = next(i for i, c in enumerate(cands) if bad in c)
        raise InvalidRequest(
            "unknown field; expected video_id, features", f"candidates[{i}].{shown(bad)}"
        )
    try:
        ids = [c["video_id"] for c in cands]
    except KeyError:
        i = next(i for i, c in enumerate(cands) if "video_id" not in c)
        raise InvalidRequest("is required", f"candidates[{i}].video_id") from None
    if "features" not in keys:
        return ids, {}, set()
    feats = [c.get("features") for c in cands]
    types = set(map(type, feats))
    if types != {dict}:
        if types - {dict, type(None)}:
            i = next(i for i, f in enumerate(feats) if f is not None and type(f) is not dict)
            raise InvalidRequest("must be an object of item features", f"candidates[{i}].features")
        feats = [_EMPTY if f is None else f for f in feats]
    names: set[str] = set().union(*feats)
    columns = {name: [f.get(name) for f in feats] for name in view.item_columns if name in names}
    return ids, columns, names - view.item


def _columnar(
    cands: dict[str, Any], n: int, view: SchemaView
) -> tuple[list[Any], dict[str, Any], set[str]]:
    if extra := cands.keys() - CANDIDATE_KEYS:
        raise InvalidRequest(
            "unknown field; expected video_id, features", f"candidates.{shown(min(extra))}"
        )
    features = cands.get("features")
    if features is None:
        features = {}
    elif type(features) is not dict:
        raise InvalidRequest("must be an object of feature columns", "candidates.features")
    for name, col in features.items():
        if type(col) is not list or len(col) != n:
            raise InvalidRequest(
                f"must be a list of {n} values (one per video_id)",
                f"candidates.features.{shown(name)}",
            )
    columns = {name: features[name] for name in view.item_columns if name in features}
    return cands["video_id"], columns, features.keys() - view.item


def _check_ids(ids: list[Any], path: Callable[[int], str]) -> None:
    """video_ids are integers or short strings, and unique (42 and "42" are the same video)."""
    types = set(map(type, ids))
    if not types <= _ID_TYPES:
        i = next(i for i, v in enumerate(ids) if type(v) not in _ID_TYPES)
        raise InvalidRequest(_ID_RULE, path(i))
    if str in types and max(len(v) for v in ids if type(v) is str) > MAX_ID_CHARS:
        i = next(i for i, v in enumerate(ids) if type(v) is str and len(v) > MAX_ID_CHARS)
        raise InvalidRequest(_ID_RULE, path(i))
    keys = [str(v) for v in ids] if len(types) > 1 else ids
    if len(set(keys)) != len(keys):
        seen: set[Any] = set()
        dupes: list[Any] = []
        for key, v in zip(keys, ids, strict=True):
            if key in seen and v not in dupes:
                dupes.append(v)
            seen.add(key)
        shown = ", ".join(orjson.dumps(v).decode() for v in dupes[:20])
        more = f" and {len(dupes) - 20} more" if len(dupes) > 20 else ""
        raise InvalidRequest(
            f"duplicate video_id(s): {shown}{more}", "candidates", {"duplicates": dupes[:100]}
        )
