"""Model graphs: the exported (fused) graph vs the straightforward export of the same weights,
in fp32 and with int8 dynamic quantisation; speed, output parity, which nodes the quantiser
converted, and the held-out AUC cost of int8.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pandas as pd

from benchmarks.floor import OUTPUTS, interleaved, session
from model.export import compare, export_onnx
from model.features import FeatureSchema
from model.metrics import auc
from model.mmoe import RankingModel

VARIANTS = ("fused", "naive")
FLOAT_MATMULS = frozenset({"MatMul", "Gemm", "FusedGemm", "FusedMatMul"})
INT8_MATMULS = frozenset(
    {"MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QGemm"}
)


def quantize_int8(src: Path, dest: Path) -> Path:
    """int8 dynamic quantisation (weights int8, activations quantised per call).

    Uses the exporter's own quantiser when model/export.py provides one (the flag behind
    ``vidrank train --quantize``), so the benchmark measures what would be published.
    """
    from model import export

    own = getattr(export, "quantize_dynamic_int8", None)
    if own is not None:
        own(src, dest)
        return dest
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # "consider pre-processing": shape inference adds nothing here
    try:
        quantize_dynamic(str(src), str(dest), weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
    return dest


def export_graphs(model: RankingModel, schema: FeatureSchema, out_dir: Path) -> dict[str, Path]:
    """{name: path} for fused/naive x fp32/int8 exports of ``model``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for variant in VARIANTS:
        fp32 = out_dir / f"{variant}-fp32.onnx"
        export_onnx(model, schema, fp32, variant=variant)  # type: ignore[arg-type]
        paths[f"{variant}_fp32"] = fp32
        paths[f"{variant}_int8"] = quantize_int8(fp32, out_dir / f"{variant}-int8.onnx")
    return paths


def op_census(path: Path) -> dict[str, Any]:
    """Op types in the graph file, and its float vs int8 matrix multiplications."""
    graph = onnx.load(str(path)).graph
    ops = Counter(node.op_type for node in graph.node)
    return {
        "ops": dict(sorted(ops.items())),
        "float_matmuls": sorted(n.name for n in graph.node if n.op_type in FLOAT_MATMULS),
        "int8_matmuls": sum(ops[op] for op in INT8_MATMULS),
        "size_bytes": path.stat().st_size,
    }


def optimised_census(path: Path) -> dict[str, int]:
    """Op types after onnxruntime's own graph optimisation (what actually runs)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = 1
    out = path.with_suffix(".ort-optimised.onnx")
    opts.optimized_model_filepath = str(out)
    opts.log_severity_level = 3
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    ops = Counter(node.op_type for node in onnx.load(str(out)).graph.node)
    out.unlink(missing_ok=True)
    return dict(sorted(ops.items()))


def run_graph(path: Path, feeds: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, Any]]:
    """Outputs of the graph for each encoded request."""
    sess = session(path, 1)
    names = [i.name for i in sess.get_inputs()]
    return [
        dict(zip(OUTPUTS, sess.run(OUTPUTS, {k: f[k] for k in names}), strict=True)) for f in feeds
    ]


def parity(paths: Mapping[str, Path], feeds: Sequence[Mapping[str, np.ndarray]]) -> dict:
    """Max differences of every graph's outputs from the fused fp32 graph's."""
    reference = run_graph(paths["fused_fp32"], feeds)
    out: dict[str, dict[str, float]] = {}
    for name, path in paths.items():
        if name == "fused_fp32":
            continue
        diffs = [compare(r, o) for r, o in zip(reference, run_graph(path, feeds), strict=True)]
        out[name] = {k: max(d[k] for d in diffs) for k in diffs[0]}
    return out


def time_graphs(
    paths: Mapping[str, Path],
    encoded_by_n: Mapping[int, Sequence[Mapping[str, np.ndarray]]],
    min_time_s: float,
) -> dict[str, dict[str, dict[str, float]]]:
    """{graph: {str(n): latency percentiles}} with one intra-op thread, interleaved."""
    sessions = {name: session(path, 1) for name, path in paths.items()}
    return interleaved(sessions, encoded_by_n, min_time_s)


# -- held-out AUC --------------------------------------------------------------------------------

REQUEST_KEYS = ("user_id", "hour", "day_of_week", "tab")


def heldout_requests(
    frame: pd.DataFrame, schema: FeatureSchema
) -> list[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """The held-out impressions grouped into requests (one user + context, N items).

    Returns (row positions, encoded inputs) per request; rows of one user at one hour, day and
    tab form one request, as the ranking service would have scored them.
    """
    columns = {n: frame[n].to_numpy() for n in schema.names() if n in frame.columns}
    encoded = schema.encode_rows(columns, len(frame))
    keys = [k for k in REQUEST_KEYS if k in frame.columns]
    groups = frame.groupby(keys, sort=False).indices
    out = []
    for rows in groups.values():
        first = rows[:1]
        feed = {k: v[rows] if k.startswith("item_") else v[first] for k, v in encoded.items()}
        out.append((rows, feed))
    return out


def heldout_auc(
    paths: Mapping[str, Path], frame: pd.DataFrame, schema: FeatureSchema
) -> dict[str, Any]:
    """Click/like AUC on the held-out frame for each graph, and int8 - fp32 deltas."""
    requests = heldout_requests(frame, schema)
    labels = {"click": frame["click"].to_numpy(), "like": frame["like"].to_numpy()}
    scores: dict[str, dict[str, float]] = {}
    for name, path in paths.items():
        preds = {t: np.empty(len(frame), dtype=np.float64) for t in labels}
        outputs = run_graph(path, [feed for _, feed in requests])
        for (rows, _), out in zip(requests, outputs, strict=True):
            for t in labels:
                preds[t][rows] = out[t]
        scores[name] = {t: auc(labels[t], preds[t]) for t in labels}
    deltas = {
        f"{v}_int8": {t: scores[f"{v}_int8"][t] - scores[f"{v}_fp32"][t] for t in labels}
        for v in VARIANTS
        if f"{v}_int8" in scores and f"{v}_fp32" in scores
    }
    return {"rows": len(frame), "requests": len(requests), "auc": scores, "delta": deltas}
