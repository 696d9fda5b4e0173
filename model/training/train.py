"""``vidrank train``: data -> fit (one process or DDP) -> ONNX bundle -> registry.

``run_train(job)`` is what the CLI calls with a validated ``TrainJob`` (model/training/config.py).
It returns early with ``--if-empty`` when the registry already serves a model, fails before
training when the version exists, then runs ``fit`` (model/training/fit.py) in this process -
or hands over to model/training/distributed.py for ``--nproc N`` or under torchrun - and
publishes the result (model/training/publish.py). The process that published then writes the
version's report (model/training/analysis/report.py): this module is the one place where the
`vidrank train` run reaches into the analysis room, so the fit path below it never does.
"""

from __future__ import annotations

import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from model.core.registry import Registry
from model.training import distributed
from model.training.analysis.report import REPORT_FILE, write_report
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
        published = distributed.run_distributed(job, version)
    else:
        result = _fit_here(job)
        published = publish(result, job, version)
        announce(result, published, job)
    if not distributed.under_torchrun() or os.environ["RANK"] == "0":  # torchrun: rank 0 published
        report_or_warn(registry, published)
    return published


def _fit_here(job: TrainJob) -> TrainResult:
    """``fit`` in this process: on prepared or streamed data from disk, or on a frame."""
    arch = f"training {job.train.arch} (seed {job.train.seed})"
    if is_prepared(job.data) or streams(job.data, job.stream):
        with tempfile.TemporaryDirectory(prefix="vidrank-stream-") as tmp:
            data = prepare_data(job, Path(tmp), 1)
            print(f"{sum(data.rows.values()):,} impressions, streamed; {arch}")
            return fit_prepared(data, job.train, test_features=job.quantize)
    frame = load_frame(job)
    print(f"{len(frame):,} impressions; {arch}")
    return fit(frame, job.train)


def report_or_warn(registry: Registry, version: str) -> None:
    """Write the published version's report, or say how to retry.

    The version is out by then, so a report that fails is reported rather than failing the run.
    """
    try:
        where = write_report(registry, version)
    except Exception as e:  # the model is out; the report can be redone
        print(f"warning: no report ({type(e).__name__}: {e}); retry: vidrank report {version}")
        return
    print(f"report: {where / REPORT_FILE}")
