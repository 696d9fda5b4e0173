"""Where a run's impressions come from: ``--data DIR`` (KuaiRand's schema) or ``--simulate N``
(of the world ``--preset`` names, model/simulator/world.py's PRESETS)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pandas as pd

from model.simulator.world import SimConfig, preset_config, simulate, write_simulation
from model.training.config import TrainJob
from model.training.data import load_impressions


def simulated_impressions(
    n: int, seed: int, task_correlation: float | None = None, preset: str = "default"
) -> pd.DataFrame:
    """``n`` simulated impressions of the named preset's world as the trainer's frame.

    ``task_correlation``, when given, overrides the preset's. The simulation goes through a
    temporary Parquet directory and ``load_impressions`` so that simulated and real data take the
    very same loading path (about 0.2 s per 1M rows).
    """
    overrides = {} if task_correlation is None else {"task_correlation": task_correlation}
    return simulated_frame(preset_config(preset, n_impressions=n, seed=seed, **overrides))


def simulated_frame(config: SimConfig) -> pd.DataFrame:
    """The trainer's frame of one simulated world (through Parquet, as real data)."""
    data = simulate(config)
    with tempfile.TemporaryDirectory(prefix="vidrank-sim-") as tmp:
        write_simulation(data, Path(tmp))
        return load_impressions(Path(tmp))


def load_frame(job: TrainJob) -> pd.DataFrame:
    """The impression frame named by the job's ``--data`` or ``--simulate``."""
    if job.simulate is not None:
        return simulated_impressions(job.simulate, job.train.seed, preset=job.preset)
    assert job.data is not None  # TrainJob holds exactly one of the two
    return load_impressions(job.data)
