"""The encoder's keys stay those of every published bundle: a reference hash and a stored fixture.

Published bundles index their embedding tables by these keys, so a change to how a value keys
re-maps every bundle's embeddings silently. Two independent checks guard them:

- a reference implementation of the string key and the bucket mix, written here in plain Python
  ints and hashlib (the encoder as it was at commit 8f6abd3), compared with the encoder on
  arbitrary text: any code point (lone surrogates too), whitespace, digits, long strings;
- ``encoder_keys.json``: integer keys and encoded rows that the encoder of 8f6abd3 computed (the
  last commit before the column-at-once encoder) for hand-picked and random strings, tag lists,
  mixed columns and a 100-candidate /rank request. Integers only: they are the same on every
  CPU, where float bytes need not be.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.core import features
from model.core.bundle import load_bundle
from model.core.features import MAX_STRING_CHARS, default_schema, id_keys
from model.core.registry import Registry
from service.scoring.request import SchemaView, encoder_input, parse_request

FIXTURE = json.loads((Path(__file__).parent / "encoder_keys.json").read_text())
SCHEMA = default_schema()
ITEM = SCHEMA.layout("item")
MASK = 2**64 - 1


# -- the reference: the encoder's keys as they were, in plain Python ---------------------------
def ref_key(value: str | int) -> int:
    """Integers, and strings of ASCII digits, key as the integer; other strings by blake2b."""
    if isinstance(value, int):
        return value & MASK
    t = value.strip()
    digits = t[1:] if t.startswith("-") else t
    if 0 < len(digits) < 19 and digits.isascii() and digits.isdigit():
        return int(t) & MASK
    data = t.encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def ref_bucket(key: int, buckets: int) -> int:
    """The splitmix64 finaliser, modulo the bucket count."""
    z = (key + 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return (z ^ (z >> 31)) % buckets


def ref_tags(text: str, max_len: int) -> list[int]:
    """Keys of a comma-separated tag string: blank parts skipped, the first max_len kept."""
    return [ref_key(p) for p in text.split(",") if p.strip()][:max_len]


def _ints(encoded: dict[str, np.ndarray]) -> dict[str, list]:
    """The integer inputs, and the count of pooled slots per multi-categorical (not its floats)."""
    out = {k: v.tolist() for k, v in encoded.items() if v.dtype.kind == "i"}
    for k, v in encoded.items():
        if k.endswith("_multi_w"):
            out[k[:-2] + "_count"] = (v > 0).sum(axis=-1).tolist()
    return out


# -- arbitrary text ----------------------------------------------------------------------------
SPACES = " \t\n\x0b\x0c\r\x1c\x1d\x1e\x1f\x85\xa0\u1680\u2000\u2009\u2028\u3000"
chars = st.one_of(
    st.characters(),
    st.sampled_from(SPACES + "-+0123456789٣²１,\x00"),
    st.integers(0xD800, 0xDFFF).map(chr),  # lone surrogates: hashed through surrogatepass
)
texts = st.one_of(
    st.text(chars, max_size=12),
    st.integers(-(10**20), 10**20).map(str),  # 1 to 21 digits: int keys up to 18 of them
    st.tuples(st.sampled_from(["", " ", "\u3000"]), st.integers(-(10**19), 10**19)).map(
        lambda t: f"{t[0]}{t[1]}{t[0]}"
    ),
    st.tuples(st.text(chars, min_size=1, max_size=5), st.integers(13, MAX_STRING_CHARS)).map(
        lambda t: (t[0] * t[1])[:MAX_STRING_CHARS]  # long: beyond what the caches keep, to the max
    ),
)
tag_texts = st.lists(texts, max_size=6).map(",".join).filter(lambda s: len(s) <= MAX_STRING_CHARS)


@settings(max_examples=200, deadline=None)
@given(strings=st.lists(texts, min_size=1, max_size=30))
def test_text_keys_equal_the_reference(strings: list[str]) -> None:
    want = [ref_key(s) for s in strings]
    for _ in range(2):  # new strings, then the same ones from the cache
        assert id_keys(strings).tolist() == want
        assert id_keys(np.array(strings, dtype=object)).tolist() == want


@settings(max_examples=100, deadline=None)
@given(
    ids=st.lists(
        st.one_of(texts, st.integers(-(2**63), 2**64 - 1), st.none()), min_size=1, max_size=12
    ),
    tags=st.data(),
)
def test_categorical_and_tag_columns_equal_the_reference(ids: list, tags: st.DataObject) -> None:
    n = len(ids)
    tag_col = tags.draw(st.lists(tag_texts, min_size=n, max_size=n))
    author = SCHEMA.by_name("author_id")
    tag = SCHEMA.by_name("tag")
    enc = SCHEMA.encode_entity("item", {"author_id": ids, "tag": tag_col}, n)
    col = ITEM.cat.index("author_id")
    keys = [ref_key(author.default if v is None else v) for v in ids]  # type: ignore[arg-type]
    want_ids = [ITEM.offsets["author_id"] + ref_bucket(k, author.buckets) for k in keys]
    assert enc["item_cat"][:, col].tolist() == want_ids
    for i, text in enumerate(tag_col):
        want = [ITEM.offsets["tag"] + ref_bucket(k, tag.buckets) for k in ref_tags(text, 4)]
        got = enc["item_multi"][i, 0]
        assert got[: len(want)].tolist() == want and not got[len(want) :].any()
        assert int((enc["item_multi_w"][i, 0] > 0).sum()) == len(want)


# -- the stored fixture ------------------------------------------------------------------------
def test_keys_are_those_the_encoder_of_8f6abd3_computed() -> None:
    for _ in range(2):  # new strings, then the same ones from the cache
        assert id_keys(FIXTURE["strings"]).tolist() == FIXTURE["keys"]
        tags = SCHEMA.encode_entity("item", {"tag": FIXTURE["tags"]}, len(FIXTURE["tags"]))
        assert _ints(tags) == FIXTURE["tags_encoded"]
        for name, values in FIXTURE["mixed"].items():
            enc = SCHEMA.encode_entity("item", {name: values}, len(values))
            assert _ints(enc) == FIXTURE["mixed_encoded"][name], name


def _request_inputs(schema: features.FeatureSchema) -> dict[str, np.ndarray]:
    """The fixture's /rank body, through the service's parse -> columns -> encode path."""
    req = parse_request(orjson.dumps(FIXTURE["request"]), 1000)
    given = encoder_input(req, SchemaView.of(schema))
    return schema.encode(given.user, given.context, given.items, given.n)


def test_a_request_encodes_to_the_rows_of_8f6abd3() -> None:
    assert _ints(_request_inputs(SCHEMA)) == FIXTURE["request_encoded"]


def test_a_published_bundle_scores_a_fixed_request_as_before(tiny_bundle: tuple[Path, str]) -> None:
    # The bundle's embedding rows are addressed by the encoder's keys: fed the rows the encoder
    # of 8f6abd3 computed for this request, it must score exactly what it scores from today's.
    registry, version = tiny_bundle
    bundle = load_bundle(Registry(registry).version_dir(version))
    now = _request_inputs(bundle.schema)
    before = {**now}
    for name, rows in FIXTURE["request_encoded"].items():
        if not name.endswith("_count"):
            before[name] = np.asarray(rows, dtype=np.int64)
    assert _ints(before) == _ints(now)
    session = ort.InferenceSession(str(bundle.onnx_path), providers=["CPUExecutionProvider"])
    feeds = [{i.name: x[i.name] for i in session.get_inputs()} for x in (before, now)]
    scores = [session.run(None, feed) for feed in feeds]
    for a, b in zip(*scores, strict=True):
        np.testing.assert_array_equal(a, b)


# -- the caches --------------------------------------------------------------------------------
def packed(s: str) -> bytes:
    return ref_key(s).to_bytes(8, "little")


def test_a_full_cache_drops_its_oldest_strings_and_still_answers_right() -> None:
    cache = features._StringCache(lambda f, strings: [packed(s) for s in strings], 3)
    f = SCHEMA.by_name("author_id")
    words = [f"w{i}" for i in range(7)]
    assert cache.values(f, words) == [packed(w) for w in words]
    assert len(cache) == 3  # the last three stay
    assert cache.values(f, ["w0", "w6", "w0"]) == [packed("w0"), packed("w6"), packed("w0")]
    assert len(cache) == 3
    with pytest.raises(features.FeatureError) as err:
        cache.values(f, ["w1", "x" * (MAX_STRING_CHARS + 1), "y" * 300], first_row=5)
    assert err.value.row == 6


def test_threads_sharing_a_small_cache_get_their_own_keys() -> None:
    cache = features._StringCache(lambda f, strings: [packed(s) for s in strings], 50)
    f = SCHEMA.by_name("author_id")
    wrong: list[int] = []

    def work(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(200):
            words = [f"t{int(i)}" for i in rng.integers(0, 400, size=40)]
            if cache.values(f, words) != [packed(w) for w in words]:
                wrong.append(seed)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong and len(cache) <= 50
