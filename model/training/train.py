"""``vidrank train``: data -> fit (one process or DDP) -> ONNX bundle -> registry.

``run_train(job)`` is what the CLI calls with a validated ``TrainJob`` (model/training/config.py).
It returns early with ``--if-empty`` when the registry already serves a model, fails before
training when the version exists, then runs ``fit`` (model/training/fit.py) in this process -
or hands over to model/training/distributed.py for ``--nproc N`` or under torchrun - and
publishes the result (model/training/publish.py).
"""

from __future__ import annotations

import tempfile
from datetime import UTC, datetime
from pathlib import Path

from model.core.registry import Registry
from model.training import distributed
from model.training.config import TrainJob
from model.training.fit import TrainResult, fit
from model.training.prepared import fit_prepared, is_prepared, prepare_data
from model.training.publish import announce, publish
from model.training.sources import load_frame
from model.training.stream import streams


def default_version() -> str:
    """``v`` + UTC timestamp, e.g. ``v20240501-120000``."""
    return "v" + datetime.now(UTC).strftime("%Y%m%d-%H%M%S")


def run_train(job: TrainJob) -> str:
    """Train and publish; returns the published version (or production's, with ``if_empty``)."""
    registry = Registry(job.registry)
    if job.if_empty and (production := registry.read_aliases().production):
        print(f"registry {job.registry} already serves {production}; nothing to do (--if-empty)")
        return production
    version = job.version or default_version()
    if registry.has(version):  # fail before training, not after
        raise ValueError(f"version {version!r} is already published in {job.registry}")
    if job.nproc > 1 or distributed.under_torchrun():
        return distributed.run_distributed(job, version)
    result = _fit_here(job)
    published = publish(result, job, version)
    announce(result, published, job)
    return published


def _fit_here(job: TrainJob) -> TrainResult:
    """``fit`` in this process: on prepared or streamed data from disk, or on a frame."""
    arch = f"training {job.train.arch} (seed {job.train.seed})"
    if is_prepared(job.data) or streams(job.data, job.stream):
        with tempfile.TemporaryDirectory(prefix="vidrank-stream-") as tmp:
            data = prepare_data(job, Path(tmp), 1)
            print(f"{sum(data.rows.values()):,} impressions, streamed; {arch}")
            return fit_prepared(data, job.train)
    frame = load_frame(job)
    print(f"{len(frame):,} impressions; {arch}")
    return fit(frame, job.train)
