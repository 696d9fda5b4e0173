"""The one onnxruntime session factory: serving, the export parity check and the benchmarks all
run a graph with the same options, so a parity result holds for what is served.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnxruntime as ort

PROVIDERS: tuple[str, ...] = ("CPUExecutionProvider",)


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, not the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def session_options(intra_op_threads: int = 0) -> ort.SessionOptions:
    """Deliberate settings: full graph optimisation, sequential execution, sized thread pools.

    ``intra_op_threads`` 0 means one thread per available core.
    """
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = intra_op_threads if intra_op_threads > 0 else available_cores()
    opts.inter_op_num_threads = 1  # sequential execution never uses the inter-op pool
    opts.log_severity_level = 3  # warnings from the optimiser are not actionable at serving time
    return opts


def make_session(path: Path | str, intra_op_threads: int = 0) -> ort.InferenceSession:
    """An onnxruntime CPU session for the graph at ``path`` with :func:`session_options`."""
    return ort.InferenceSession(
        str(path), sess_options=session_options(intra_op_threads), providers=list(PROVIDERS)
    )
