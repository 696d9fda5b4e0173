"""Model bundle: manifest building, writing, loading and validation (no real ONNX needed)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from model.core.bundle import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    MODEL_FILE,
    TASKS,
    Bundle,
    BundleError,
    build_manifest,
    load_bundle,
    normalise_dtype,
    sha256_file,
    validate_against_session_io,
    write_bundle,
)
from model.core.features import default_schema

VERSIONS = {"onnxruntime": "1.20.0", "torch": "2.13.0", "onnx": "1.16.0", "vidrank": "0.1.0"}
FUSION = {"method": "weighted_sum", "weights": {"click": 1.0, "watch_time": 0.1, "like": 2.0}}


def make_bundle(dest: Path, version: str = "v1", payload: bytes | None = None) -> Bundle:
    """A bundle whose model.onnx is random bytes: the bundle layer never parses the graph."""
    dest.mkdir(parents=True, exist_ok=True)
    onnx = dest / MODEL_FILE
    onnx.write_bytes(payload if payload is not None else os.urandom(512))
    manifest = build_manifest(
        version=version,
        schema=default_schema(),
        onnx_path=onnx,
        tasks=TASKS,
        mmoe_config={"n_experts": 4, "expert_dims": [64, 32]},
        metrics={"auc_click": 0.71, "auc_like": 0.8},
        default_fusion=FUSION,
        opset=17,
        versions=VERSIONS,
    )
    return write_bundle(dest, onnx, manifest)


def read_manifest(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((path / MANIFEST_FILE).read_text())
    return data


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))


@pytest.fixture
def bundle_dir(tmp_path: Path) -> Path:
    return make_bundle(tmp_path / "b").path


# -- building / writing ------------------------------------------------------------------------


def test_build_manifest_fields(tmp_path: Path) -> None:
    onnx = tmp_path / "g.onnx"
    onnx.write_bytes(b"graph-bytes")
    schema = default_schema()
    m = build_manifest(
        version="v1",
        schema=schema,
        onnx_path=onnx,
        tasks=TASKS,
        mmoe_config={"n_experts": 4},
        metrics={"auc_click": 0.7},
        default_fusion=FUSION,
        opset=17,
        versions=VERSIONS,
        gate_diagnostics={"entropy": [0.5, 0.6, 0.7]},
    )
    assert m["format_version"] == FORMAT_VERSION
    assert m["version"] == "v1"
    assert m["created_at"].endswith("Z") and "T" in m["created_at"]
    assert m["feature_schema"] == schema.to_dict()
    assert m["inputs"] == schema.input_specs()
    assert m["outputs"] == [{"name": t, "dtype": "float32", "shape": ["N"]} for t in TASKS]
    assert m["tasks"] == [
        {"name": "click", "kind": "probability", "unit": "probability"},
        {"name": "watch_time", "kind": "expected_value", "unit": "seconds"},
        {"name": "like", "kind": "probability", "unit": "probability"},
    ]
    assert m["sha256"] == hashlib.sha256(b"graph-bytes").hexdigest()
    assert m["size_bytes"] == len(b"graph-bytes")
    assert m["opset"] == 17 and m["versions"] == VERSIONS
    assert m["gate_diagnostics"] == {"entropy": [0.5, 0.6, 0.7]}
    json.dumps(m, allow_nan=False)  # plain JSON


def test_build_manifest_sanitises_numpy_and_nan(tmp_path: Path) -> None:
    onnx = tmp_path / "g.onnx"
    onnx.write_bytes(b"x")
    m = build_manifest(
        version="v1",
        schema=default_schema(),
        onnx_path=onnx,
        tasks=TASKS,
        mmoe_config={"n_experts": np.int64(4)},
        metrics={"auc_click": np.float32(0.5), "auc_like": float("nan"), "hist": np.arange(3)},
        default_fusion=FUSION,
        opset=17,
        versions=VERSIONS,
        extra={"training": {"epochs": 3}},
    )
    assert m["metrics"] == {"auc_click": 0.5, "auc_like": None, "hist": [0, 1, 2]}
    assert type(m["mmoe_config"]["n_experts"]) is int
    assert m["training"] == {"epochs": 3}


def test_build_manifest_rejects_bad_input(tmp_path: Path) -> None:
    onnx = tmp_path / "g.onnx"
    onnx.write_bytes(b"x")
    common: dict[str, Any] = {
        "schema": default_schema(),
        "onnx_path": onnx,
        "mmoe_config": {},
        "metrics": {},
        "default_fusion": FUSION,
        "opset": 17,
        "versions": VERSIONS,
    }
    with pytest.raises(BundleError, match="invalid version name"):
        build_manifest(version="../evil", tasks=TASKS, **common)
    with pytest.raises(BundleError, match="unknown task"):
        build_manifest(version="v1", tasks=("click", "dwell"), **common)
    with pytest.raises(BundleError, match="shadow"):
        build_manifest(version="v1", tasks=TASKS, extra={"sha256": "x"}, **common)


def test_write_and_load_roundtrip(tmp_path: Path) -> None:
    payload = os.urandom(3000)
    b = make_bundle(tmp_path / "b", version="2024-05-01.a_1", payload=payload)
    loaded = load_bundle(b.path)
    assert loaded.manifest == b.manifest
    assert loaded.version == "2024-05-01.a_1"
    assert loaded.onnx_path.read_bytes() == payload
    assert loaded.size_bytes == len(payload)
    assert loaded.sha256 == hashlib.sha256(payload).hexdigest()
    assert loaded.schema.to_dict() == default_schema().to_dict()
    assert loaded.inputs == default_schema().input_specs()
    assert [o["name"] for o in loaded.outputs] == list(TASKS)
    assert loaded.task_names == list(TASKS)
    assert loaded.default_fusion == FUSION
    assert loaded.metrics == {"auc_click": 0.71, "auc_like": 0.8}
    # No temp files are left behind by the atomic writes.
    assert sorted(p.name for p in b.path.iterdir()) == [MANIFEST_FILE, MODEL_FILE]


def test_write_bundle_recomputes_checksum(tmp_path: Path) -> None:
    src = make_bundle(tmp_path / "src")
    other = os.urandom(100)
    # A stale sha256/size in the given manifest is replaced by the written bytes' values.
    b = write_bundle(tmp_path / "from-bytes", other, src.manifest)
    assert b.sha256 == hashlib.sha256(other).hexdigest() and b.size_bytes == 100
    b2 = write_bundle(tmp_path / "from-path", src.onnx_path, src.manifest)
    assert b2.onnx_path.read_bytes() == src.onnx_path.read_bytes()
    assert b2.sha256 == src.sha256


def test_write_bundle_rejects_inconsistent_manifest(tmp_path: Path) -> None:
    src = make_bundle(tmp_path / "src")
    bad = dict(src.manifest, inputs=src.manifest["inputs"][:-1])
    with pytest.raises(BundleError, match="incompatible schema"):
        write_bundle(tmp_path / "bad", b"abc", bad)


def test_sha256_file_streams(tmp_path: Path) -> None:
    data = os.urandom((1 << 20) * 2 + 17)  # spans several chunks
    p = tmp_path / "f"
    p.write_bytes(data)
    assert sha256_file(p) == hashlib.sha256(data).hexdigest()


# -- load failures -----------------------------------------------------------------------------


def test_checksum_mismatch(bundle_dir: Path) -> None:
    model = bundle_dir / MODEL_FILE
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="checksum mismatch") as info:
        load_bundle(bundle_dir)
    assert hashlib.sha256(bytes(data)).hexdigest() in info.value.reason
    assert load_bundle(bundle_dir, verify=False).version == "v1"  # verification is opt-out


def test_truncated_model_detected_even_without_verify(bundle_dir: Path) -> None:
    model = bundle_dir / MODEL_FILE
    model.write_bytes(model.read_bytes()[:100])
    with pytest.raises(BundleError, match="checksum mismatch"):
        load_bundle(bundle_dir)
    with pytest.raises(BundleError, match="size mismatch"):
        load_bundle(bundle_dir, verify=False)


def test_missing_directory_and_files(tmp_path: Path, bundle_dir: Path) -> None:
    with pytest.raises(BundleError, match="not found"):
        load_bundle(tmp_path / "nope")
    (bundle_dir / MODEL_FILE).unlink()
    with pytest.raises(BundleError, match=f"no {MODEL_FILE}"):
        load_bundle(bundle_dir)
    other = make_bundle(tmp_path / "other").path
    (other / MANIFEST_FILE).unlink()
    with pytest.raises(BundleError, match=f"no {MANIFEST_FILE}"):
        load_bundle(other)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe", "not valid UTF-8"),
        (b"[1, 2]", "JSON object"),
        (b"", "not valid JSON"),
    ],
)
def test_bad_manifest_json(bundle_dir: Path, content: bytes, reason: str) -> None:
    (bundle_dir / MANIFEST_FILE).write_bytes(content)
    with pytest.raises(BundleError, match=reason):
        load_bundle(bundle_dir)


@pytest.mark.parametrize(
    "key",
    ["format_version", "version", "feature_schema", "inputs", "outputs", "tasks", "sha256"],
)
def test_missing_required_key(bundle_dir: Path, key: str) -> None:
    m = read_manifest(bundle_dir)
    del m[key]
    write_manifest(bundle_dir, m)
    with pytest.raises(BundleError, match=f"missing required key.*{key}"):
        load_bundle(bundle_dir)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("inputs", {"a": 1}),
        ("size_bytes", "12"),
        ("size_bytes", True),
        ("format_version", 1.0),
        ("feature_schema", []),
        ("metrics", [0.7]),
        ("gate_diagnostics", "x"),
    ],
)
def test_wrong_key_type(bundle_dir: Path, key: str, value: Any) -> None:
    m = read_manifest(bundle_dir)
    m[key] = value
    write_manifest(bundle_dir, m)
    with pytest.raises(BundleError, match=f"'{key}' must be"):
        load_bundle(bundle_dir)


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("format_version", 99, "unsupported format_version 99"),
        ("version", "../v1", "invalid version name"),
        ("sha256", "abc", "sha256 must be"),
        ("size_bytes", 1, "size mismatch"),
        ("feature_schema", {"features": [{"name": "x"}]}, "invalid feature schema"),
        ("feature_schema", {}, "invalid feature schema"),
        ("feature_schema", {"features": "user_id"}, "invalid feature schema"),
    ],
)
def test_invalid_manifest_values(bundle_dir: Path, key: str, value: Any, reason: str) -> None:
    m = read_manifest(bundle_dir)
    m[key] = value
    write_manifest(bundle_dir, m)
    with pytest.raises(BundleError, match=reason):
        load_bundle(bundle_dir)


def test_incompatible_inputs(bundle_dir: Path) -> None:
    m = read_manifest(bundle_dir)
    cases = {
        "missing": m["inputs"][1:],
        "extra": [*m["inputs"], {"name": "item_emb", "dtype": "float32", "shape": ["N", 8]}],
        "shape": [dict(m["inputs"][0], shape=[1, 99]), *m["inputs"][1:]],
        "dtype": [dict(m["inputs"][0], dtype="float32"), *m["inputs"][1:]],
    }
    for inputs in cases.values():
        write_manifest(bundle_dir, dict(m, inputs=inputs))
        with pytest.raises(BundleError, match="incompatible schema"):
            load_bundle(bundle_dir)
    # The input list's order does not matter: inputs are fed by name.
    write_manifest(bundle_dir, dict(m, inputs=list(reversed(m["inputs"]))))
    load_bundle(bundle_dir)


def test_schema_change_without_inputs_change_is_incompatible(bundle_dir: Path) -> None:
    m = read_manifest(bundle_dir)
    # Drop one item numeric feature from the schema: item_num shrinks to ["N", 1].
    feats = m["feature_schema"]["features"]
    m["feature_schema"]["features"] = [f for f in feats if f["name"] != "duration_s"]
    write_manifest(bundle_dir, m)
    with pytest.raises(BundleError, match="incompatible schema: item_num"):
        load_bundle(bundle_dir)


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda m: m.update(outputs=m["outputs"][1:]), "outputs lack required task head.*click"),
        (lambda m: m["outputs"][0].update(dtype="int64"), "click must be float32"),
        (lambda m: m.update(outputs=[*m["outputs"], m["outputs"][0]]), "click' twice"),
        (lambda m: m.update(outputs=[1, 2, 3]), r"outputs\[0\] must be an object"),
        (lambda m: m.update(tasks=m["tasks"][:2]), "tasks lack required head.*like"),
        (lambda m: m["tasks"][0].update(kind="logit"), "kind must be one of"),
        (lambda m: m["tasks"].append({"name": "share"}), r"tasks\[3\] must be an object"),
        (
            lambda m: m["tasks"].append({"name": "share", "kind": "probability", "unit": "p"}),
            "share has no ONNX output",
        ),
    ],
)
def test_bad_outputs_and_tasks(bundle_dir: Path, mutate: Any, reason: str) -> None:
    m = read_manifest(bundle_dir)
    mutate(m)
    write_manifest(bundle_dir, m)
    with pytest.raises(BundleError, match=reason):
        load_bundle(bundle_dir)


# -- session I/O check -------------------------------------------------------------------------


def _ort_like_io(bundle: Bundle) -> tuple[list[tuple[str, str, list[Any]]], list[str]]:
    """What an onnxruntime session would report for a correct export (symbolic dims)."""
    names = {"int64": "tensor(int64)", "float32": "tensor(float)"}
    meta = [
        (e["name"], names[e["dtype"]], ["batch" if d == "N" else d for d in e["shape"]])
        for e in bundle.inputs
    ]
    return meta, [*TASKS, "gate_weights"]


def test_session_io_ok(tmp_path: Path) -> None:
    b = make_bundle(tmp_path / "b")
    meta, outs = _ort_like_io(b)
    validate_against_session_io(b, meta, outs)
    # Unknown (None) dims and shapes, and (name, dtype) output tuples are accepted too.
    meta2 = [(n, d, None) for n, d, _ in meta]
    validate_against_session_io(b, meta2, [(t, "tensor(float)") for t in TASKS])
    meta3 = [(n, d, [None if isinstance(x, str) else x for x in s]) for n, d, s in meta]
    validate_against_session_io(b, meta3, outs)


def test_session_io_mismatches(tmp_path: Path) -> None:
    b = make_bundle(tmp_path / "b")
    meta, outs = _ort_like_io(b)
    bad_dtype = [(meta[0][0], "tensor(float)", meta[0][2]), *meta[1:]]
    fixed_item = [(n, d, [7, *s[1:]]) if n.startswith("item") else (n, d, s) for n, d, s in meta]
    wrong_width = [(meta[0][0], meta[0][1], [1, 99]), *meta[1:]]
    wrong_rank = [(meta[0][0], meta[0][1], [1]), *meta[1:]]
    cases: list[tuple[Any, Any, str]] = [
        (meta[1:], outs, "graph lacks inputs"),
        ([*meta, ("extra", "tensor(int64)", [1])], outs, "does not declare.*extra"),
        (bad_dtype, outs, "is float32 in the graph"),
        (fixed_item, outs, "fixed to 7 in the graph but dynamic"),
        (wrong_width, outs, "axis 1 is 99 in the graph"),
        (wrong_rank, outs, "rank 1"),
        (meta, ["click", "like"], "lacks output watch_time"),
        (meta, [("click", "tensor(double)"), "watch_time", "like"], "click is float64"),
    ]
    for input_meta, output_names, reason in cases:
        with pytest.raises(BundleError, match=reason):
            validate_against_session_io(b, input_meta, output_names)


def test_normalise_dtype() -> None:
    assert normalise_dtype("tensor(int64)") == "int64"
    assert normalise_dtype("tensor(float)") == "float32"
    assert normalise_dtype("tensor(double)") == "float64"
    assert normalise_dtype("float32") == "float32"


# -- serving-path imports ----------------------------------------------------------------------


def test_no_heavy_imports() -> None:
    code = (
        "import sys\n"
        "for m in ('torch', 'onnx', 'onnxruntime'):\n"
        "    sys.modules[m] = None  # any import of these now raises ImportError\n"
        "import model.core.bundle, model.core.registry\n"
        "heavy = [m for m in ('torch', 'onnx', 'onnxruntime') if sys.modules.get(m) is not None]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
