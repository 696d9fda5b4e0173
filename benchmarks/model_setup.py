"""The model under test: trained once on simulated data, published to a benchmark registry.

The trained weights are kept next to the registry, keyed by the training settings and by the
source of the model code, so a second run skips training but a change to the exporter or the
network retrains.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from model.core.features import FeatureSchema
from model.core.registry import Registry
from model.training.config import TrainConfig
from model.training.data import split_by_time
from model.training.fit import TrainResult, fit
from model.training.mmoe import MMoEConfig, RankingModel, build_model
from model.training.publish import write_result_bundle
from model.training.sources import simulated_impressions

VERSION = "bench-a"
SWAP_VERSION = "bench-b"
INT8_VERSION = "bench-int8"


@dataclass
class BenchModel:
    """A trained model, its held-out impressions and its published bundle."""

    model: RankingModel
    schema: FeatureSchema
    config: MMoEConfig
    test: pd.DataFrame
    registry: Path
    version: str
    metrics: dict[str, Any]
    int8_version: str | None = None  # None when int8 lost too much AUC to be published
    int8_note: str = ""

    @property
    def bundle_dir(self) -> Path:
        return Registry(self.registry).version_dir(self.version)

    def bundle_of(self, version: str) -> Path:
        return Registry(self.registry).version_dir(version)


def _code_hash() -> str:
    """A hash of the offline code: a cached model is retrained whenever model/ changes."""
    root = Path(__file__).resolve().parent.parent / "model"
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def prepare_model(
    work_dir: Path, impressions: int, epochs: int, small: bool, seed: int = 0
) -> BenchModel:
    """Train (or reload) the benchmark model and make it production in its registry."""
    size = "small" if small else "default"
    home = work_dir / f"model-{size}-{impressions}-e{epochs}-s{seed}-{_code_hash()}"
    registry = Registry(home / "registry")
    state_path = home / "state.pt"
    frame = simulated_impressions(impressions, seed)
    _, _, test = split_by_time(frame)
    if state_path.exists() and registry.has(VERSION):
        bundle = registry.bundle(VERSION)
        config = MMoEConfig.from_dict(bundle.manifest["mmoe_config"])
        model = build_model(config, bundle.schema)
        model.load_state_dict(torch.load(state_path, weights_only=True))
        model.eval()
        metrics = dict(bundle.metrics)
        schema = bundle.schema
    else:
        result = fit(frame, TrainConfig(small=small, epochs=epochs, seed=seed), verbose=False)
        with tempfile.TemporaryDirectory(prefix="vidrank-bench-") as tmp:
            registry.publish(write_result_bundle(result, Path(tmp) / VERSION, VERSION, seed))
            _publish_int8(result, registry, Path(tmp), seed, home)
        torch.save(result.model.state_dict(), state_path)
        model, schema, config = result.model.eval(), result.schema, result.config
        metrics = dict(result.metrics)
    registry.activate(VERSION)
    bm = BenchModel(model, schema, config, test, registry.root, VERSION, metrics)
    if registry.has(INT8_VERSION):
        bm.int8_version = INT8_VERSION
    else:
        refused = home / "int8-refused.txt"
        bm.int8_note = refused.read_text().strip() if refused.exists() else "no int8 bundle"
    return bm


def _publish_int8(
    result: TrainResult, registry: Registry, tmp: Path, seed: int, home: Path
) -> None:
    """The same weights published as an int8 bundle (``vidrank train --quantize``), if allowed."""
    try:
        bundle = write_result_bundle(result, tmp / INT8_VERSION, INT8_VERSION, seed, quantize=True)
    except RuntimeError as e:  # int8 refused (held-out AUC drop): record why, measure fp32 only
        (home / "int8-refused.txt").write_text(str(e))
        return
    registry.publish(bundle)
