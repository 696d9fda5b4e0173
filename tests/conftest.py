"""Shared session fixtures (a tiny seeded model, trained once and published into a registry) and
the rules that sort tests into tiers.

torch is imported inside the fixtures, never at module level, so that test modules which check
that the service runs without torch are not affected by merely collecting this file.

Tiers (pyproject.toml's markers; README "Development"):

- ``live``: the test needs a live server, a redis-server or nginx, subprocess or DDP training,
  pip or schemathesis. Added here from what the test uses - its path (``LIVE_PATHS``), its
  fixtures (``LIVE_FIXTURES``) or its skip-unless-installed marker - never by hand, so a new live
  test cannot slip into ``make test-fast`` (which deselects the marker).
- ``cpu_sensitive``: the test checks float output of numpy, torch or onnxruntime kernels (against
  stored reference values or another computation). ``make test`` runs these a second time on
  numpy's baseline kernels and onnxruntime's restricted path (``--ort-restricted``).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from benchmarks.harness import NGINX_MISSING, REDIS_MISSING

if TYPE_CHECKING:
    import onnxruntime as ort
    import pandas as pd

    from benchmarks.harness import RedisServer
    from model.training.config import TrainConfig
    from model.training.fit import TrainResult

TESTS = Path(__file__).resolve().parent
# Whole modules that run real processes: uvicorn servers and schemathesis (integration), the
# benchmark harness, DDP/torchrun training, nginx replicas, a pip-installed serve venv.
LIVE_PATHS = (
    "integration/",
    "benchmarks/",
    "model/training/test_distributed.py",
    "deploy/test_rollout.py",
    "deploy/test_serve_env.py",
)
# Fixtures that start a server process (uvicorn, redis-server, nginx).
LIVE_FIXTURES = frozenset({"start_server", "redis_server", "run_nginx"})
# A test skipped when one of these is not installed runs it.
LIVE_SKIP_REASONS = frozenset({NGINX_MISSING, REDIS_MISSING})
# Modules whose assertions read float output of numpy/onnxruntime kernels that differ between SIMD
# paths (transcendentals, fused graph kernels): stored reference values, torch-vs-onnxruntime
# parity, scores recomputed at 1e-12. Training determinism is per machine (docs/internals.md), so
# test_train.py, which only compares runs on one machine, is not run twice.
CPU_SENSITIVE_PATHS = (
    "model/training/test_simulate.py",
    "model/training/test_export.py",
    "model/training/test_data.py",
    "model/core/test_fusion.py",
    "model/core/test_metrics.py",
    "model/core/test_features.py",
    "model/core/test_distribution.py",
    "service/test_api_rank.py",
)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--ort-restricted",
        action="store_true",
        help="run onnxruntime sessions on its restricted path: no graph optimisation, no "
        "weight prepacking, one intra-op thread (see docs/internals.md, Determinism)",
    )


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--ort-restricted"):
        import model.core.runtime as runtime

        default = runtime.session_options

        def restricted(intra_op_threads: int = 0) -> ort.SessionOptions:
            import onnxruntime as ort

            opts = default(1)
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            opts.add_session_config_entry("session.disable_prepacking", "1")
            return opts

        runtime.session_options = restricted  # make_session looks it up at each call


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Which kernels this run used: numpy's SIMD dispatch targets and onnxruntime's path."""
    from tests.cpu_features import dispatched_features

    enabled = " ".join(dispatched_features()) or "none (baseline kernels only)"
    path = "restricted" if config.getoption("--ort-restricted") else "default"
    return [f"numpy SIMD dispatch targets in use: {enabled}; onnxruntime: {path} path"]


def _under(item: pytest.Item, paths: tuple[str, ...]) -> bool:
    rel = Path(str(item.path)).resolve().relative_to(TESTS).as_posix()
    return any(rel == p or (p.endswith("/") and rel.startswith(p)) for p in paths)


def _is_live(item: pytest.Item) -> bool:
    uses = getattr(item, "fixturenames", ())
    skips = {str(m.kwargs.get("reason", "")) for m in item.iter_markers("skipif")}
    return _under(item, LIVE_PATHS) or bool(
        LIVE_FIXTURES.intersection(uses) or skips & LIVE_SKIP_REASONS
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _is_live(item):
            item.add_marker(pytest.mark.live)
        if _under(item, CPU_SENSITIVE_PATHS):
            item.add_marker(pytest.mark.cpu_sensitive)


TINY_IMPRESSIONS = 20_000
TINY_SEED = 0
TINY_VERSION = "v-tiny"
SHIFTED_VERSION = "v-shifted"
LIKE_LOGIT_SHIFT = 2.0  # ~ x6.5 on a 2 % like probability


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server on a free loopback port, stopped at teardown."""
    from benchmarks.harness import RedisServer

    server = RedisServer(tmp_path / "redis")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_frame() -> pd.DataFrame:
    """20k simulated impressions (seeded) in the trainer's frame layout, with truth columns."""
    from model.training.sources import simulated_impressions

    return simulated_impressions(TINY_IMPRESSIONS, TINY_SEED)


@pytest.fixture(scope="session")
def tiny_config() -> TrainConfig:
    """The tiny model's ``TrainConfig`` (small network, 1 epoch, seed 0)."""
    from model.training.config import TrainConfig

    return TrainConfig(small=True, epochs=1, seed=TINY_SEED)


@pytest.fixture(scope="session")
def trained_model(tiny_frame: pd.DataFrame, tiny_config: TrainConfig) -> TrainResult:
    """A ``TrainResult``: torch model, fitted schema, config, test frame and its predictions."""
    from model.training.fit import fit

    return fit(tiny_frame, tiny_config, verbose=False)


@pytest.fixture(scope="session")
def heldout_bodies(trained_model: TrainResult) -> list[dict]:
    """30 /rank bodies of 100 candidates drawn from the tiny model's held-out impressions.

    Traffic like the data the manifest's prediction distribution was measured on, so a drift
    check sees a healthy version as healthy (hand-made bodies with made-up ids are not).
    """
    from benchmarks.workload import build_workload

    return build_workload(trained_model.test, trained_model.schema, [100], per_n=30, seed=1).bodies[
        100
    ]


@pytest.fixture(scope="session")
def tiny_bundle(
    tmp_path_factory: pytest.TempPathFactory, trained_model: TrainResult, tiny_config: TrainConfig
) -> tuple[Path, str]:
    """(registry path, version): the tiny model exported, published and activated."""
    from model.training.config import TrainJob
    from model.training.publish import publish

    registry = tmp_path_factory.mktemp("registry")
    job = TrainJob(registry=registry, simulate=TINY_IMPRESSIONS, train=tiny_config, activate=True)
    return registry, publish(trained_model, job, TINY_VERSION)


@pytest.fixture
def registry_copy(tiny_bundle: tuple[Path, str], tmp_path: Path) -> Path:
    """A private copy of the tiny registry, for tests that publish or change aliases."""
    dest = tmp_path / "registry"
    shutil.copytree(tiny_bundle[0], dest, ignore=shutil.ignore_patterns(".lock", ".tmp-*"))
    return dest


@pytest.fixture
def version(tiny_bundle: tuple[Path, str]) -> str:
    """The tiny bundle's version name (production in ``registry_copy``)."""
    return tiny_bundle[1]


@pytest.fixture(scope="session")
def shifted_bundle(
    tmp_path_factory: pytest.TempPathFactory,
    trained_model: TrainResult,
    tiny_bundle: tuple[Path, str],
) -> Path:
    """An export gone wrong: the tiny model with a bias added to the like head's logit.

    The bundle carries the tiny bundle's manifest (renamed ``v-shifted``), so the held-out
    prediction distribution it stores is the healthy model's while its graph predicts ~6x the
    likes: what a drift check must catch. Not published; tests publish it into their registry.
    """
    import copy

    import torch

    from model.core.bundle import write_bundle
    from model.core.registry import Registry
    from model.training.export import export_onnx

    model = copy.deepcopy(trained_model.model)
    like = list(trained_model.config.tasks).index("like")
    with torch.no_grad():
        model.heads.calibration_shift[like] += LIKE_LOGIT_SHIFT  # the final logit, any --arch
    out = tmp_path_factory.mktemp("shifted")
    export_onnx(model, trained_model.schema, out / "shifted.onnx")
    registry, version = tiny_bundle
    manifest = dict(Registry(registry).bundle(version).manifest, version=SHIFTED_VERSION)
    return write_bundle(out / SHIFTED_VERSION, out / "shifted.onnx", manifest).path


@pytest.fixture(scope="session")
def sim_tables(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's simulated world as KuaiRand-schema files (Parquet).

    The same users and videos the tiny model was trained on: the simulated world depends on the
    seed, not on the number of impressions, so 2000 impressions suffice for the tables.
    """
    from model.simulator.world import SimConfig, simulate, write_simulation

    out = tmp_path_factory.mktemp("sim")
    write_simulation(simulate(SimConfig(n_impressions=2000, seed=TINY_SEED)), out)
    return out


@pytest.fixture(scope="session")
def feature_tables(sim_tables: Path) -> tuple[dict, dict]:
    """(entity tables, source) of ``sim_tables``, as ``vidrank features publish`` builds them."""
    from model.core.store.snapshot import build_tables
    from model.training.feature_tables import feature_columns

    columns, source = feature_columns(sim_tables)
    return build_tables(columns), source
