"""ONNX export: interface, torch/onnxruntime parity and the naive-vs-fused graph equivalence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from model.core.features import default_schema
from model.core.runtime import make_session
from model.training.export import (
    NaiveMMoE,
    compare,
    export_onnx,
    parity,
    random_encoded,
    run_session,
    torch_predict,
)
from model.training.fit import TrainResult
from model.training.layers import Interactions
from model.training.mmoe import ARCHS, INTERACTIONS, MMoE, MMoEConfig, SharedBottom, build_model

DTYPES: dict[int, str] = {onnx.TensorProto.INT64: "int64", onnx.TensorProto.FLOAT: "float32"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, trained_model: TrainResult) -> Path:
    path = tmp_path_factory.mktemp("export") / "model.onnx"
    export_onnx(trained_model.model, trained_model.schema, path)
    return path


def graph_io(path: Path) -> tuple[list[dict], list[dict]]:
    def describe(values: list[onnx.ValueInfoProto]) -> list[dict]:
        return [
            {
                "name": v.name,
                "dtype": DTYPES[v.type.tensor_type.elem_type],
                "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
            }
            for v in values
        ]

    graph = onnx.load(str(path)).graph
    return describe(list(graph.input)), describe(list(graph.output))


def test_inputs_and_outputs_follow_the_schema(exported: Path, trained_model: TrainResult) -> None:
    inputs, outputs = graph_io(exported)
    assert inputs == trained_model.schema.input_specs()
    for spec in inputs:
        expected_batch = "N" if spec["name"].startswith("item_") else 1
        assert spec["shape"][0] == expected_batch
    assert outputs == [
        {"name": name, "dtype": "float32", "shape": ["N"]}
        for name in ("click", "watch_time", "like")
    ]


def test_parity_of_the_trained_model(exported: Path, trained_model: TrainResult) -> None:
    result = parity(trained_model.model, trained_model.schema, exported, n_values=(1, 7, 1000))
    assert set(result["per_n"]) == {"1", "7", "1000"}
    assert result["max_abs_prob"] <= 1e-5
    assert result["max_rel_watch"] <= 1e-4


@pytest.mark.parametrize("arch", ["mmoe", "shared_bottom"])
@pytest.mark.parametrize("kinds", [(), ("dots",), ("bilinear", "first_order"), INTERACTIONS])
def test_parity_of_the_default_config(tmp_path: Path, arch: str, kinds: tuple[str, ...]) -> None:
    torch.manual_seed(1)
    schema = default_schema()
    cfg = MMoEConfig(arch=arch, watch_scale=5.0, interactions=kinds)
    model = MMoE(cfg, schema) if arch == "mmoe" else SharedBottom(cfg, schema)
    if model.interactions is not None:  # trained-like magnitudes, not the near-zero init
        for p in model.interactions.parameters():
            torch.nn.init.normal_(p, std=0.3)
    with torch.no_grad():  # a fitted calibration is part of the graph
        model.heads.calibration_scale.copy_(torch.tensor([[0.9], [1.1], [0.8]]))
        model.heads.calibration_shift.copy_(torch.tensor([[0.2], [-0.1], [-0.3]]))
    export_onnx(model, schema, tmp_path / "m.onnx")
    result = parity(model, schema, tmp_path / "m.onnx", n_values=(1, 7, 1000), seed=3)
    assert result["max_abs_prob"] <= 1e-5 and result["max_rel_watch"] <= 1e-4


def user_side_tiled(path: Path) -> list[str]:
    """Expand/Tile nodes that tile a tensor computed from the user/context inputs alone to the
    candidates' batch: a graph without any computes the user side once per request.
    """
    graph = onnx.load(str(path)).graph
    user = {i.name for i in graph.input if not i.name.startswith("item_")}
    item = {i.name for i in graph.input if i.name.startswith("item_")}
    tiled = []
    for node in graph.node:  # topologically sorted
        ins = [i for i in node.input if i]
        if node.op_type in ("Expand", "Tile") and ins[0] in user and ins[0] not in item:
            if ins[1] in item:  # the target shape comes from the candidates
                tiled.append(node.name)
        if any(i in item for i in ins):
            item.update(node.output)
        if any(i in user for i in ins):
            user.update(node.output)
    return tiled


@pytest.mark.parametrize(
    ("arch", "entire_space"),
    [*((arch, False) for arch in ARCHS), ("mmoe", True), ("stem", True)],
)
def test_every_arch_exports_with_parity_and_the_user_side_once(
    tmp_path: Path, arch: str, entire_space: bool
) -> None:
    torch.manual_seed(2)
    schema = default_schema()
    config = MMoEConfig(arch=arch, watch_scale=5.0, entire_space=entire_space)
    model = build_model(config, schema)
    for module in model.modules():  # trained-like interaction magnitudes, not the near-zero init
        if isinstance(module, Interactions):
            for p in module.parameters():
                torch.nn.init.normal_(p, std=0.3)
    with torch.no_grad():  # a fitted calibration is part of the graph
        model.heads.calibration_scale.copy_(torch.tensor([[0.9], [1.1], [0.8]]))
        model.heads.calibration_shift.copy_(torch.tensor([[0.2], [-0.1], [-0.3]]))
    path = tmp_path / "m.onnx"
    export_onnx(model, schema, path)
    result = parity(model, schema, path, n_values=(1, 7, 1000), seed=3)
    assert result["max_abs_prob"] <= 1e-5 and result["max_rel_watch"] <= 1e-4
    assert user_side_tiled(path) == []


def test_the_naive_graph_tiles_the_user_side(
    tmp_path: Path, exported: Path, trained_model: TrainResult
) -> None:
    # The check above can fail: the naive graph tiles the request's user rows to N.
    naive = tmp_path / "naive.onnx"
    export_onnx(trained_model.model, trained_model.schema, naive, variant="naive")
    assert user_side_tiled(naive) != [] and user_side_tiled(exported) == []


def test_naive_graph_equals_fused_graph(
    tmp_path: Path, exported: Path, trained_model: TrainResult
) -> None:
    model, schema = trained_model.model, trained_model.schema
    assert isinstance(model, MMoE)
    naive = tmp_path / "naive.onnx"
    export_onnx(model, schema, naive, variant="naive")
    assert graph_io(naive) == graph_io(exported)
    fused_session, naive_session = make_session(exported), make_session(naive)
    rng = np.random.default_rng(7)
    for n in (1, 7, 300):
        encoded = random_encoded(schema, n, rng)
        fused_out = run_session(fused_session, encoded)
        diff = compare(fused_out, run_session(naive_session, encoded))
        assert diff["max_abs_prob"] <= 1e-5 and diff["max_rel_watch"] <= 1e-5
        # and the naive torch module itself equals the fused torch model
        diff = compare(torch_predict(model, encoded), torch_predict(NaiveMMoE(model), encoded))
        assert diff["max_abs_prob"] <= 1e-5 and diff["max_rel_watch"] <= 1e-5


def test_naive_variant_is_mmoe_only(tmp_path: Path) -> None:
    schema = default_schema()
    baseline = SharedBottom(MMoEConfig.small(arch="shared_bottom"), schema)
    with pytest.raises(ValueError, match="MMoE"):
        export_onnx(baseline, schema, tmp_path / "x.onnx", variant="naive")


def test_export_leaves_training_mode_alone(tmp_path: Path) -> None:
    schema = default_schema()
    model = MMoE(MMoEConfig.small(), schema).train()
    export_onnx(model, schema, tmp_path / "m.onnx")
    assert model.training
