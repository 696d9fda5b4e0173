"""Serving cost per architecture: FLOPs per candidate and the exported graph's CPU ms per request.

Every ``--arch`` is built with the trainer's default network (weights at their seeded
initialisation: timing does not depend on what was learnt), exported request-shaped (user side
once per request) and timed in onnxruntime with one intra-op thread on the same encoded requests,
in turns over several rounds (``benchmarks.floor.interleaved``), so that load on a shared
machine spreads over every graph alike. An arch may carry an experiment's options
(``mmoe:paper``, ``ple:levels2``). Ratios against ``mmoe`` (the default) are what to compare
across machines.

    python -m benchmarks.arch_cost [--archs stem,mmoe] [--seconds 6] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from benchmarks.floor import interleaved, session
from benchmarks.workload import build_workload
from model.core.features import default_schema
from model.training.analysis.experiment import variant
from model.training.config import TrainConfig
from model.training.export import export_onnx
from model.training.fit import network_config
from model.training.mmoe import ARCHS, MMoEConfig, build_model, flops_per_candidate
from model.training.sources import simulated_impressions

REFERENCE = "mmoe"
NS = (100, 500)


def measure(archs: Sequence[str], seconds: float, requests: int = 8) -> dict[str, dict]:
    """{arch: {"mflops": per candidate (user side once), "cpu_ms": {n: p50}, "wall_ms": ...}}."""
    frame = simulated_impressions(20_000, 0)
    schema = default_schema().fit({n: frame[n].to_numpy() for n in default_schema().names()})
    work = build_workload(frame, schema, list(NS), requests)
    encoded = {n: work.encoded(n) for n in NS}
    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="vidrank-archs-") as tmp:
        sessions = {}
        for arch in archs:
            torch.manual_seed(0)
            cfg = network(arch)
            path = Path(tmp) / f"{arch}.onnx"
            export_onnx(build_model(cfg, schema), schema, path)
            sessions[arch] = session(path, 1)
            flops = flops_per_candidate(cfg, schema, user_side_once=True)
            out[arch] = {"mflops": flops / 1e6, "bytes": path.stat().st_size}
        timed = interleaved(sessions, encoded, seconds)
    for arch in archs:
        out[arch]["cpu_ms"] = {n: timed[arch][str(n)]["cpu_p50"] for n in NS}
        out[arch]["wall_ms"] = {n: timed[arch][str(n)]["p50"] for n in NS}
    return out


def network(arch: str) -> MMoEConfig:
    """The trainer's network for an experiment arch (``mmoe``, ``mmoe:paper``, ``ple:levels2``
    ...): the architecture's own recipe and the variant's options, as ``fit`` would build it."""
    base, options = variant(arch)
    return network_config(TrainConfig(arch=base, **options), watch_scale=5.0)


def markdown(results: dict[str, dict]) -> str:
    """One row per architecture, ratios against ``REFERENCE`` where it was measured."""
    ref = results.get(REFERENCE)
    head = "| arch | MFLOP/candidate | graph MB | " + " | ".join(
        f"CPU ms @{n} (× {REFERENCE})" for n in NS
    )
    lines = [head + " |", "|" + "---|" * (3 + len(NS))]
    for arch, r in results.items():
        cells = []
        for n in NS:
            ratio = f" ({r['cpu_ms'][n] / ref['cpu_ms'][n]:.2f}×)" if ref else ""
            cells.append(f"{r['cpu_ms'][n]:.2f}{ratio}")
        row = f"| {arch} | {r['mflops']:.3f} | {r['bytes'] / 1e6:.1f} | " + " | ".join(cells)
        lines.append(row + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", default=",".join([*ARCHS, "ple:levels2"]))
    p.add_argument("--seconds", type=float, default=6.0, help="timing per (arch, N)")
    p.add_argument("--out", type=Path, help="also write the table to this Markdown file")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    np.random.seed(0)
    table = markdown(measure([s for s in a.archs.split(",") if s], a.seconds))
    print(table)
    if a.out:
        a.out.write_text(table)


if __name__ == "__main__":
    main()
