"""The floor: onnxruntime ``session.run`` on pre-encoded inputs, in-process, nothing else."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from benchmarks.stats import percentiles_ms, time_calls

OUTPUTS = ["click", "watch_time", "like"]


def session(path: Path | str, threads: int) -> ort.InferenceSession:
    """A CPU session with full graph optimisation, sequential execution and ``threads`` intra-op."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def feeds(sess: ort.InferenceSession, encoded: Sequence[Mapping[str, np.ndarray]]) -> list[dict]:
    """The session's inputs picked out of each encoded request."""
    names = [i.name for i in sess.get_inputs()]
    return [{k: np.ascontiguousarray(e[k]) for k in names} for e in encoded]


def time_session(
    sess: ort.InferenceSession, encoded: Sequence[Mapping[str, np.ndarray]], min_time_s: float
) -> dict[str, float]:
    """Latency percentiles (ms) of ``session.run`` cycling over the requests."""
    prepared = feeds(sess, encoded)
    state = {"i": 0}

    def call() -> None:
        state["i"] += 1
        sess.run(OUTPUTS, prepared[state["i"] % len(prepared)])

    return percentiles_ms(time_calls(call, min_time_s, min_calls=30))


def measure_floor(
    onnx_path: Path,
    encoded_by_n: Mapping[int, Sequence[Mapping[str, np.ndarray]]],
    threads: Sequence[int],
    min_time_s: float,
) -> dict[str, Any]:
    """{"threads<k>": {str(n): percentiles}} for each thread count and candidate count."""
    out: dict[str, Any] = {}
    for t in threads:
        sess = session(onnx_path, t)
        out[f"threads{t}"] = {
            str(n): time_session(sess, enc, min_time_s) for n, enc in encoded_by_n.items()
        }
    return out
