"""Model graphs: the exported (fused) graph vs the straightforward export of the same weights,
in fp32 and with int8 dynamic quantisation; speed, output parity, which nodes the quantiser
converted, and the held-out AUC cost of int8.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pandas as pd

from benchmarks.floor import OUTPUTS, interleaved, session
from model.core.features import FeatureSchema
from model.core.metrics import auc
from model.training.export import compare, export_onnx, predict_frame, quantize_int8
from model.training.mmoe import RankingModel

VARIANTS = ("fused", "trained", "naive")
FLOAT_MATMULS = frozenset({"MatMul", "Gemm", "FusedGemm", "FusedMatMul"})
INT8_MATMULS = frozenset(
    {"MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QGemm"}
)


def export_graphs(model: RankingModel, schema: FeatureSchema, out_dir: Path) -> dict[str, Path]:
    """{name: path} for fused/trained/naive x fp32/int8 exports of ``model``.

    int8 is the exporter's own quantiser (the one behind ``vidrank train --quantize``).
    """
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


def heldout_auc(
    paths: Mapping[str, Path], frame: pd.DataFrame, schema: FeatureSchema
) -> dict[str, Any]:
    """Click/like AUC on the held-out frame (scored as requests) per graph; int8 - fp32 deltas."""
    labels = {"click": frame["click"].to_numpy(), "like": frame["like"].to_numpy()}
    scores: dict[str, dict[str, float]] = {}
    for name, path in paths.items():
        preds = predict_frame(path, schema, frame)
        scores[name] = {t: auc(labels[t], preds[t]) for t in labels}
    deltas = {
        f"{v}_int8": {t: scores[f"{v}_int8"][t] - scores[f"{v}_fp32"][t] for t in labels}
        for v in VARIANTS
        if f"{v}_int8" in scores and f"{v}_fp32" in scores
    }
    return {"rows": len(frame), "auc": scores, "delta": deltas}
