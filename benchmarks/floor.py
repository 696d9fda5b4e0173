"""The floor: onnxruntime ``session.run`` on pre-encoded inputs, in-process, nothing else."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from benchmarks.stats import percentiles_ms, time_calls
from model.core.bundle import TASKS
from model.core.runtime import session_options

OUTPUTS = list(TASKS)
ROUNDS = 5


def session(path: Path | str, threads: int) -> ort.InferenceSession:
    """A session with exactly the options the service uses, and ``threads`` intra-op threads."""
    opts = session_options(threads)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def feeds(sess: ort.InferenceSession, encoded: Sequence[Mapping[str, np.ndarray]]) -> list[dict]:
    """The session's inputs picked out of each encoded request."""
    names = [i.name for i in sess.get_inputs()]
    return [{k: np.ascontiguousarray(e[k]) for k in names} for e in encoded]


def sample_session(
    sess: ort.InferenceSession, encoded: Sequence[Mapping[str, np.ndarray]], min_time_s: float
) -> tuple[list[float], list[float]]:
    """(wall, thread CPU) seconds per ``session.run``, cycling over the requests."""
    prepared = feeds(sess, encoded)
    state = {"i": 0}

    def call() -> None:
        state["i"] += 1
        sess.run(OUTPUTS, prepared[state["i"] % len(prepared)])

    return time_calls(call, min_time_s, min_calls=10)


def interleaved(
    sessions: Mapping[str, ort.InferenceSession],
    encoded_by_n: Mapping[int, Sequence[Mapping[str, np.ndarray]]],
    min_time_s: float,
    rounds: int = ROUNDS,
) -> dict[str, dict[str, dict[str, float]]]:
    """{name: {str(n): percentiles (ms)}}, timing the sessions in turn over several rounds.

    Round-robin rather than one after the other: a burst of background load then spreads over
    every session instead of skewing whichever happened to run during it. ``cpu_p50`` is the
    median CPU time of the calling thread (the compute itself with one intra-op thread).
    """
    wall: dict[tuple[str, int], list[float]] = {}
    cpu: dict[tuple[str, int], list[float]] = {}
    for _ in range(rounds):
        for n, enc in encoded_by_n.items():
            for name, sess in sessions.items():
                w, c = sample_session(sess, enc, min_time_s / rounds)
                wall.setdefault((name, n), []).extend(w)
                cpu.setdefault((name, n), []).extend(c)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name in sessions:
        out[name] = {}
        for n in encoded_by_n:
            stats = percentiles_ms(wall[(name, n)])
            stats["cpu_p50"] = float(np.median(cpu[(name, n)]) * 1e3)
            out[name][str(n)] = stats
    return out


def measure_floor(
    graphs: Mapping[str, tuple[Path, int]],
    encoded_by_n: Mapping[int, Sequence[Mapping[str, np.ndarray]]],
    min_time_s: float,
) -> dict[str, Any]:
    """{name: {str(n): percentiles}} for each (graph, intra-op threads) and candidate count."""
    sessions = {name: session(path, threads) for name, (path, threads) in graphs.items()}
    return interleaved(sessions, encoded_by_n, min_time_s)
