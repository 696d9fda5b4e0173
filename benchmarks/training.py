"""``python -m benchmarks.training`` (run by ``make bench`` and ``make bench-quick``): training
throughput of the default architecture, in impressions per second, with a per-phase breakdown.

One simulated world is encoded once; then each variant of the training step (below) trains a
freshly built model (``fit.build``) for a number of steps of the real mini-batches, through the
loop's own ``Step`` and ``Optimizers``. The variants run in turns, ``--repeats`` rounds of all
of them, so that a machine whose load drifts slows them alike; the table shows medians. Per
phase: ``batch`` (index the encoded split), ``forward`` (forward pass and losses),
``backward``, ``optimiser``. ``cpu imp/s`` counts impressions per second of this process's CPU
time times the threads, which a shared machine disturbs less than the wall clock.

Variants (the model and its data are the same; only the step's mechanics differ):

``eager-dense``    fp32, dense gradients and fused Adam over everything, no compile
``bf16``           ... with the forward pass under bf16 autocast (``--precision bf16``; the
                   default ``auto`` picks it where the CPU has bf16 kernels)
``bf16+gradnorm``  ... with GradNorm's loss weights (``--loss-balance gradnorm``, measured every
                   ``GRADNORM_EVERY`` steps)
``bf16+rows``      bf16 with row-wise table gradients and Adam over the rows in use (``--sparse``)
``default``        ``TrainConfig()``: what ``vidrank train`` runs (bf16 where the CPU has it,
                   row-wise tables, the default ``mmoe`` with gradnorm)
``compile``        ... fp32 with the dense parts compiled by torch.compile (``--compile on``;
                   ``auto`` compiles runs of ``COMPILE_MIN_STEPS`` steps or more)
``sparse+compile`` ... and row-wise table gradients (``--sparse``)
``+bf16``          ``compile`` with the forward pass under bf16 autocast (``--precision bf16``)
``+batch4096``     ``compile`` with batches of 4096 (the learning rate scaled by sqrt 2)

A before/after of a change to the model's code runs this module on both trees in turns (README
"Performance", Training).

Compilation happens in warm-up steps, which are not timed. Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.machine import machine_info, machine_slug
from model.training.batches import EncodedSplit, make_batches
from model.training.config import TrainConfig
from model.training.fit import TRAIN_THREADS, build, prepare
from model.training.loop import compiled, training_step
from model.training.sources import simulated_impressions

ROOT = Path(__file__).resolve().parent.parent
PHASES = ("batch", "forward", "backward", "optimiser")
BASE = TrainConfig(sparse=False, precision="fp32", compile="off")
COMPILED = replace(BASE, compile="on")
VARIANTS: dict[str, TrainConfig] = {
    "eager-dense": BASE,
    "bf16": replace(BASE, precision="bf16"),
    "bf16+gradnorm": replace(BASE, precision="bf16", loss_balance="gradnorm"),
    "bf16+rows": replace(BASE, precision="bf16", sparse=True),
    "default": TrainConfig(),  # what `vidrank train` runs: bf16 (auto), row-wise tables, gradnorm
    "compile": COMPILED,
    "sparse+compile": replace(COMPILED, sparse=True),
    "+bf16": replace(COMPILED, precision="bf16"),
    "+batch4096": replace(COMPILED, batch_size=4096, lr=BASE.lr * 2**0.5),
}
QUICK_VARIANTS = ("eager-dense", "bf16", "default")


@dataclass
class Settings:
    """How much to measure; ``--quick`` is the small preset."""

    impressions: int = 300_000
    steps: int = 40  # timed steps per (variant, round)
    warmup: int = 4  # untimed steps first (compilation happens here)
    repeats: int = 3
    variants: tuple[str, ...] = tuple(VARIANTS)
    out_dir: Path = ROOT / "benchmarks" / "results"


@dataclass
class Clock:
    """Seconds per phase, accumulated over the timed steps."""

    spent: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    last: float = field(default_factory=time.perf_counter)

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.spent[phase] += now - self.last
        self.last = now


def endless(split: EncodedSplit, batch_size: int) -> Iterator[Any]:
    """Mini-batches of seeded permutations, epoch after epoch."""
    rng = np.random.default_rng(0)
    while True:
        yield from make_batches(split, batch_size, rng)


def measure(config: TrainConfig, data: Any, s: Settings) -> dict[str, float]:
    """One round of one variant: impressions/s (wall and CPU) and ms per step by phase."""
    model = build(config, data.basis)
    model.train()
    step, optimizer = training_step(model, config)
    batches = endless(data.train, config.batch_size)
    with compiled(model, config.compile == "on"):
        for _ in range(s.warmup):
            step.run(model, next(batches), optimizer)
        clock, rows = Clock(), 0
        wall, cpu = time.perf_counter(), time.process_time()
        clock.last = wall
        for _ in range(s.steps):
            batch = next(batches)
            clock.mark("batch")
            step.run(model, batch, optimizer, clock.mark)
            rows += len(batch[1]["click"])
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "imp_per_s": rows / wall,
        "cpu_imp_per_s": rows / cpu * TRAIN_THREADS,
        **{f"{p}_ms": 1000 * t / s.steps for p, t in clock.spent.items()},
    }


def run(s: Settings) -> dict[str, Any]:
    """All rounds of all variants; returns the medians and the raw rounds."""
    torch.set_num_threads(TRAIN_THREADS)
    data = prepare(simulated_impressions(s.impressions, 0))
    rounds: dict[str, list[dict[str, float]]] = {v: [] for v in s.variants}
    load = [os.getloadavg()[0]]
    for r in range(s.repeats):
        for name in s.variants:
            rounds[name].append(measure(VARIANTS[name], data, s))
            load.append(os.getloadavg()[0])
            print(f"round {r + 1} {name}: {rounds[name][-1]['imp_per_s']:,.0f} imp/s", flush=True)
    medians = {
        name: {k: statistics.median(m[k] for m in ms) for k in ms[0]} for name, ms in rounds.items()
    }
    return {"medians": medians, "rounds": rounds, "load_1min": load}


def table(result: dict[str, Any]) -> str:
    """The Markdown table of the medians."""
    head = "| variant | imp/s | cpu imp/s | " + " | ".join(f"{p} ms" for p in PHASES) + " |"
    lines = [head, "|" + "---|" * (3 + len(PHASES))]
    for name, m in result["medians"].items():
        phases = " | ".join(f"{m[f'{p}_ms']:.1f}" for p in PHASES)
        lines.append(f"| {name} | {m['imp_per_s']:,.0f} | {m['cpu_imp_per_s']:,.0f} | {phases} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> Settings:
    p = argparse.ArgumentParser(prog="python -m benchmarks.training", description=__doc__)
    p.add_argument("--quick", action="store_true", help="two variants, one round, fewer steps")
    p.add_argument("--impressions", type=int, help="simulated impressions (300k)")
    p.add_argument("--steps", type=int, help="timed steps per variant and round (40)")
    p.add_argument("--repeats", type=int, help="rounds of all variants (3)")
    p.add_argument("--variants", help=f"comma-separated, from {','.join(VARIANTS)}")
    p.add_argument("--out", type=Path, help="results directory (default benchmarks/results)")
    a = p.parse_args(argv)
    s = (
        Settings(impressions=100_000, steps=15, repeats=1, variants=QUICK_VARIANTS)
        if a.quick
        else Settings()
    )
    names = tuple(a.variants.split(",")) if a.variants else s.variants
    if unknown := sorted(set(names) - set(VARIANTS)):
        p.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    updates = {
        "impressions": a.impressions,
        "steps": a.steps,
        "repeats": a.repeats,
        "out_dir": a.out,
    }
    return replace(s, variants=names, **{k: v for k, v in updates.items() if v is not None})


def main(argv: list[str] | None = None) -> None:
    s = parse_args(argv)
    info = machine_info()
    result = run(s)
    text = table(result)
    print(f"\ntraining step, default architecture, batch per variant, {TRAIN_THREADS} threads")
    print(f"1-min load average during the runs: {result['load_1min']}\n{text}")
    s.out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d")
    path = s.out_dir / f"training-{machine_slug(info)}-{stamp}.json"
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in s.__dict__.items()}
    path.write_text(json.dumps({"machine": info, "settings": settings, **result}, indent=1))
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


if __name__ == "__main__":
    main()
