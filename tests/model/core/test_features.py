"""Feature schema: encoding rules, errors that name the feature, and serialisation."""

from __future__ import annotations

import gc
import hashlib
import json
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.core import features
from model.core.features import Feature, FeatureError, FeatureSchema, default_schema

SCHEMA = default_schema().fit(
    {
        "follow_user_num": np.array([0, 10, 100, 1000]),
        "fans_user_num": np.array([0, 1, 2, 3]),
        "register_days": np.array([1, 30, 365, 900]),
        "duration_s": np.array([5.0, 15.0, 60.0, 300.0]),
        "upload_age_days": np.array([0, 1, 10, 100]),
    }
)


def encode_items(columns: dict, n: int) -> dict[str, np.ndarray]:
    return SCHEMA.encode_entity("item", columns, n)


def test_input_specs_follow_layout() -> None:
    specs = {s["name"]: s for s in SCHEMA.input_specs()}
    assert list(specs) == [
        "user_cat",
        "user_num",
        "context_cat",
        "item_cat",
        "item_multi",
        "item_multi_w",
        "item_num",
    ]
    assert specs["user_cat"]["shape"] == [1, 3]
    assert specs["item_cat"] == {"name": "item_cat", "dtype": "int64", "shape": ["N", 4]}
    assert specs["item_multi"]["shape"] == ["N", 1, 4]
    enc = SCHEMA.encode({"user_id": 1}, {"hour": 3}, {"video_id": [1, 2, 3]}, 3)
    for name, spec in specs.items():
        assert str(enc[name].dtype) == spec["dtype"]
        want = [3 if d == "N" else d for d in spec["shape"]]
        assert list(enc[name].shape) == want


def test_missing_feature_takes_default() -> None:
    omitted = SCHEMA.encode_entity("user", {"user_id": [7]}, 1)
    explicit = SCHEMA.encode_entity(
        "user", {"user_id": [7], "user_active_degree": ["UNKNOWN"], "is_video_author": [0]}, 1
    )
    np.testing.assert_array_equal(omitted["user_cat"], explicit["user_cat"])
    # a numeric with no default is the training mean: 0 after standardisation
    np.testing.assert_array_equal(omitted["user_num"], np.zeros((1, 3), dtype=np.float32))
    # None inside a column also means "use the default"
    with_none = SCHEMA.encode_entity("user", {"user_id": [7], "fans_user_num": [None]}, 1)
    np.testing.assert_array_equal(with_none["user_num"], omitted["user_num"])


def test_unknown_categorical_value_hashes_into_a_bucket() -> None:
    enc = encode_items({"video_id": ["never-seen-before", 10**30, -5]}, 3)
    lay = SCHEMA.layout("item")
    ids = enc["item_cat"][:, 0]
    assert ((ids >= lay.offsets["video_id"]) & (ids < lay.offsets["video_id"] + 100_003)).all()


def test_integer_and_integer_string_share_a_bucket() -> None:
    a = encode_items({"video_id": [42], "author_id": ["7"]}, 1)["item_cat"]
    b = encode_items({"video_id": ["42"], "author_id": [7]}, 1)["item_cat"]
    np.testing.assert_array_equal(a, b)


def test_hash_is_pinned() -> None:
    # Literal values: a change here would silently re-map every published bundle's embeddings.
    enc = encode_items({"video_id": [0, 1, 123456789, "abc"]}, 4)["item_cat"][:, 0]
    assert enc.tolist() == [55423, 59009, 98316, 76008]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_numeric_is_rejected_with_the_feature_name(bad: float) -> None:
    with pytest.raises(FeatureError) as err:
        encode_items({"video_id": [1, 2], "duration_s": [3.0, bad]}, 2)
    assert err.value.feature == "duration_s"
    assert err.value.entity == "item"
    assert err.value.row == 1


@pytest.mark.parametrize(
    ("column", "value"),
    [("duration_s", "ten"), ("duration_s", [1]), ("video_id", 1.5), ("video_id", {"a": 1})],
)
def test_wrong_type_is_rejected_with_the_feature_name(column: str, value: object) -> None:
    with pytest.raises(FeatureError) as err:
        encode_items({"video_id": [1, 2], column: [value, value]}, 2)
    assert err.value.feature == column
    assert err.value.row == 0


def test_multi_categorical_mean_pools_and_accepts_lists_or_strings() -> None:
    a = encode_items({"tag": ["12,65", [12, 65], "", None, "1,2,3,4,5,6"]}, 5)
    idx, w = a["item_multi"][:, 0], a["item_multi_w"][:, 0]
    np.testing.assert_array_equal(idx[0], idx[1])
    np.testing.assert_allclose(w[0], [0.5, 0.5, 0, 0])
    np.testing.assert_allclose(w[2], 0)  # empty: nothing pooled
    np.testing.assert_allclose(w[3], 0)
    np.testing.assert_allclose(w[4], 0.25)  # truncated to max_len = 4
    assert (idx[w == 0] == 0).all()  # padding points at index 0


def test_numeric_transform_and_standardisation() -> None:
    f = SCHEMA.by_name("duration_s")
    enc = encode_items({"duration_s": [60.0]}, 1)["item_num"][0, 0]
    assert enc == pytest.approx((np.log1p(60.0) - f.mean) / f.std, rel=1e-6)
    huge = encode_items({"duration_s": [1e300]}, 1)["item_num"][0, 0]
    assert huge == pytest.approx(10.0)  # clipped


def test_schema_roundtrips_through_json() -> None:
    d = json.loads(json.dumps(SCHEMA.to_dict()))
    assert FeatureSchema.from_dict(d) == SCHEMA


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": "x", "entity": "shop", "kind": "numeric"},
        {"name": "x", "entity": "item", "kind": "categorical", "buckets": 0},
        {"name": "x", "entity": "item", "kind": "multi_categorical", "buckets": 5},
        {"name": "x y", "entity": "item", "kind": "numeric"},
        {"name": "x", "entity": "item", "kind": "numeric", "std": 0.0},
    ],
)
def test_invalid_feature_definitions_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        Feature(**kwargs)


def test_new_feature_needs_no_code_change() -> None:
    schema = FeatureSchema(
        (*SCHEMA.features, Feature("creator_tier", "item", "categorical", buckets=5, default="x"))
    )
    enc = schema.encode_entity("item", {"creator_tier": ["gold", None]}, 2)
    assert enc["item_cat"].shape == (2, 5)


values = st.one_of(
    st.integers(min_value=-(2**62), max_value=2**62),
    st.text(alphabet="abc0123456789,-", max_size=6),
    st.none(),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(values, min_size=1, max_size=20), st.lists(st.floats(0, 1e6), min_size=20))
def test_batch_encoding_equals_row_by_row(ids: list, durations: list) -> None:
    n = len(ids)
    cols = {"video_id": ids, "author_id": ids, "tag": [str(v) if v else None for v in ids]}
    cols["duration_s"] = durations[:n]
    batch = encode_items(cols, n)
    for i in range(n):
        row = encode_items({k: [v[i]] for k, v in cols.items()}, 1)
        for name in batch:
            np.testing.assert_array_equal(batch[name][i], row[name][0])


def test_fractional_value_after_many_ints_is_rejected_not_truncated() -> None:
    with pytest.raises(FeatureError) as err:
        encode_items({"video_id": [1] * 20 + [2.5]}, 21)
    assert (err.value.feature, err.value.row) == ("video_id", 20)


def test_absent_columns_broadcast_the_default_row() -> None:
    absent = encode_items({}, 3)
    explicit = encode_items(
        {"video_type": ["NORMAL"] * 3, "tag": [""] * 3, "author_id": [0] * 3}, 3
    )
    for name in absent:
        np.testing.assert_array_equal(absent[name], explicit[name])


def test_integer_beyond_float_range_is_rejected_with_its_row() -> None:
    with pytest.raises(FeatureError) as err:
        encode_items({"duration_s": [1, 10**400]}, 2)
    assert (err.value.feature, err.value.row) == ("duration_s", 1)


def test_homogeneous_columns_take_the_numpy_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # The request path hands the body's lists over as they are: all-int and all-number columns
    # must become int64/float64 arrays in one numpy call, never the per-value object path.
    cols = {
        "video_id": [11, 12, 13],
        "author_id": [5, 6, 7],
        "duration_s": [12.5, 30.0, 7.25],
        "upload_age_days": [1, 2.5, 40],
    }
    expected = encode_items({k: np.asarray(v) for k, v in cols.items()}, 3)

    def per_value(values: object) -> np.ndarray:
        raise AssertionError("a homogeneous column took the per-value path")

    monkeypatch.setattr(features, "_object_1d", per_value)
    got = encode_items(cols, 3)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])


@pytest.mark.parametrize(("text", "as_int"), [(" 42 ", 42), ("-7", -7), ("0012", 12)])
def test_ascii_digit_strings_key_as_their_integer(text: str, as_int: int) -> None:
    np.testing.assert_array_equal(
        encode_items({"video_id": [text]}, 1)["item_cat"],
        encode_items({"video_id": [as_int]}, 1)["item_cat"],
    )


@pytest.mark.parametrize("text", ["²", "³", "--5", "٣", "٤٢", "１２"])
def test_other_digit_like_strings_hash_as_strings(text: str) -> None:
    # isdigit() is true for all of these and int() reads "٣" as 3 and "１２" as 12; a string id
    # is hashed as a string unless it is ASCII digits.
    as_string = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
    assert features._str_key(text) == as_string
    assert encode_items({"video_id": [text]}, 1)["item_cat"].shape == (1, 4)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=6)
    | st.sampled_from(["²", "--5", "-", "1e3", "12,x,", " 7 "]),
    lambda kids: (
        st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=3), kids, max_size=2)
    ),
    max_leaves=5,
)


@settings(max_examples=300, deadline=None)
@given(
    name=st.sampled_from(["author_id", "tag", "duration_s", "video_id"]),
    values=st.lists(json_values, min_size=1, max_size=4),
    user_value=json_values,
)
def test_encoder_raises_only_feature_errors(name: str, values: list, user_value: object) -> None:
    # The service names the request field from a FeatureError; any other exception would be a
    # 500. So whatever JSON holds, the encoder either encodes it or raises a FeatureError.
    for entity, columns, n in (
        ("item", {name: values}, len(values)),
        ("user", {"user_active_degree": [user_value]}, 1),
        ("user", {"fans_user_num": [user_value]}, 1),
        ("user", {"user_id": [user_value]}, 1),
    ):
        try:
            SCHEMA.encode_entity(entity, columns, n)
        except FeatureError as e:
            assert e.entity == entity and e.feature in columns
            assert e.row is None or 0 <= e.row < n


# -- bounded strings and caches ------------------------------------------------------------------
LONG = "x" * (features.MAX_STRING_CHARS + 1) if hasattr(features, "MAX_STRING_CHARS") else "x" * 257


@pytest.mark.parametrize(
    ("entity", "columns", "n", "feature", "row"),
    [
        ("item", {"author_id": ["a", LONG, "c"]}, 3, "author_id", 1),
        ("item", {"author_id": [1, "b", LONG]}, 3, "author_id", 2),
        ("item", {"author_id": np.array(["a", LONG])}, 2, "author_id", 1),
        ("item", {"tag": ["1,2", "3," + LONG]}, 2, "tag", 1),
        ("item", {"tag": [["1", LONG]]}, 1, "tag", 0),
        ("item", {"tag": [None, ["1", 2], LONG]}, 3, "tag", 2),
        ("user", {"user_id": [LONG]}, 1, "user_id", 0),
    ],
)
def test_strings_longer_than_the_limit_are_rejected_with_their_row(
    entity: str, columns: dict, n: int, feature: str, row: int
) -> None:
    with pytest.raises(FeatureError) as info:
        SCHEMA.encode_entity(entity, columns, n)
    assert info.value.feature == feature and info.value.row == row
    assert "256" in info.value.message


def test_strings_up_to_the_limit_encode() -> None:
    ok = "y" * 256
    enc = encode_items({"author_id": [ok, "z" * 65], "tag": [ok, "1," * 128]}, 2)
    assert enc["item_cat"].shape == (2, 4)


@pytest.mark.parametrize(
    ("columns", "feature"),
    [
        ({"author_id": [True]}, "author_id"),
        ({"author_id": [1, False]}, "author_id"),
        ({"author_id": np.array([True, False])}, "author_id"),
        ({"duration_s": [True]}, "duration_s"),
        ({"duration_s": [1.5, False]}, "duration_s"),
        ({"duration_s": np.array([True])}, "duration_s"),
        ({"tag": [[1, True]]}, "tag"),
    ],
)
def test_booleans_are_neither_categories_nor_numbers(columns: dict, feature: str) -> None:
    n = len(next(iter(columns.values())))
    with pytest.raises(FeatureError) as info:
        encode_items(columns, n)
    assert info.value.feature == feature


def _retained_bytes(work: object) -> int:
    """Bytes still allocated (tracemalloc) after calling ``work()`` and collecting garbage."""
    gc.collect()
    before = tracemalloc.get_traced_memory()[0]
    work()  # type: ignore[operator]
    gc.collect()
    return tracemalloc.get_traced_memory()[0] - before


def test_string_caches_keep_no_long_strings_and_stay_within_their_byte_budget() -> None:
    for cache in (features._KEYS, features._TOKENS):
        cache.clear()
    rng = np.random.default_rng(0)

    def long_ids() -> None:  # 5,000 distinct valid ids of 200-256 characters, as requests send
        for i in range(50):
            ids = [f"{i}-{j}-" + "v" * int(rng.integers(200, 250)) for j in range(100)]
            encode_items({"video_id": ids, "tag": [s[:200] for s in ids]}, 100)

    tracemalloc.start()
    try:
        assert _retained_bytes(long_ids) < 256 << 10  # today: megabytes, kept for good
        wide = "\U0010ffff" * 56  # 4 bytes per character: the largest entries a cache can hold

        def fill() -> None:  # more distinct short strings than either cache can hold
            for b in range(40):
                ids = [f"{b:03d}{i:05d}{wide}" for i in range(1000)]
                encode_items({"video_id": ids, "tag": [f"{s[:8]},{s[8:48]}" for s in ids]}, 1000)

        budget = features.KEY_CACHE_BYTES + features.TOKEN_CACHE_BYTES
        assert _retained_bytes(fill) <= budget
        for cache in (features._KEYS, features._TOKENS):
            assert len(cache) == cache.max_entries  # full: the worst case was measured
    finally:
        tracemalloc.stop()
