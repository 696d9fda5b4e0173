"""Trainer: end to end into a registry, determinism, training/serving skew, gate diagnostics."""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from model.cli import app
from model.core.bundle import load_bundle
from model.core.distribution import PREDICTION_EDGES, bin_counts
from model.core.registry import Registry
from model.core.runtime import make_session
from model.core.tasks import TASKS
from model.training.analysis.experiment import variant
from model.training.balance import FixedWeights
from model.training.batches import GateStats, Shuffled, encode_split, predict
from model.training.calibrate import calibrate_heads
from model.training.config import TrainConfig, TrainJob, parse_interactions, parse_loss_weights
from model.training.export import FrameRequests, export_onnx, parity, random_encoded, run_session
from model.training.fit import TrainResult, build, fit, model_config, prepare
from model.training.loop import (
    EarlyStopping,
    EpochLoop,
    Optimizers,
    Step,
    autocast_dtype,
    compiled,
    dense_parts,
    sparse_tables,
    stopping,
)
from model.training.mmoe import ARCHS, MMoE, MMoEConfig
from model.training.objective import RANKING_METRICS, evaluate_split, selection_value
from model.training.publish import publish
from model.training.train import run_train

HEADLINE = ("click_auc", "like_auc", "watch_rmse", "watch_xauc", "ndcg10_fused")


def test_end_to_end_train_publish_load_and_score(tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    config = TrainConfig(small=True, epochs=2, seed=3)
    job = TrainJob(registry=registry, simulate=5_000, train=config, version="v-e2e")
    assert run_train(job) == "v-e2e"
    reg = Registry(registry)
    assert reg.read_aliases().production == "v-e2e"  # the first model is activated
    bundle = load_bundle(reg.version_dir("v-e2e"))
    manifest = bundle.manifest
    assert all(isinstance(manifest["metrics"][k], float) for k in HEADLINE)
    assert MMoEConfig.from_dict(manifest["mmoe_config"]).arch == "mmoe"
    assert manifest["parity"]["max_abs_prob"] <= 1e-5  # build_manifest merges extra keys
    assert set(manifest["gate_diagnostics"]["tasks"]) == set(TASKS)
    assert set(manifest["versions"]) == {"torch", "onnx", "onnxruntime", "vidrank"}
    out = run_session(
        make_session(bundle.onnx_path), random_encoded(bundle.schema, 11, np.random.default_rng(0))
    )
    assert all(out[t].shape == (11,) and np.isfinite(out[t]).all() for t in TASKS)
    # vidrank train ends with the version's report, next to (not inside) the immutable version
    assert (registry / "reports" / "v-e2e" / "report.md").is_file()
    history = manifest["training"]["history"]
    assert all(history[0][f"train_loss_{t}"] > 0 for t in TASKS)  # per-task training curves
    assert set(manifest["calibration"]["tasks"]) == set(TASKS)
    # --if-empty: production exists, so nothing is trained and production is returned.
    again = TrainJob(registry=registry, simulate=5_000, if_empty=True)
    assert run_train(again) == "v-e2e" and Registry(registry).versions() == ["v-e2e"]


def test_publish_activates_only_when_asked_or_first(
    tmp_path: Path, trained_model: TrainResult
) -> None:
    job = TrainJob(registry=tmp_path, simulate=20_000)
    assert publish(trained_model, job, "a") == "a"
    assert Registry(tmp_path).read_aliases().production == "a"
    publish(trained_model, job, "b")
    assert Registry(tmp_path).read_aliases().production == "a"
    publish(trained_model, TrainJob(registry=tmp_path, simulate=20_000, activate=True), "c")
    assert Registry(tmp_path).read_aliases().production == "c"


def test_training_is_deterministic_per_seed(
    tiny_frame: pd.DataFrame, tiny_config: TrainConfig, trained_model: TrainResult
) -> None:
    again = fit(tiny_frame, tiny_config, verbose=False)
    timing = {"train_time_s"}
    assert {k: v for k, v in again.metrics.items() if k not in timing} == {
        k: v for k, v in trained_model.metrics.items() if k not in timing
    }
    ref = trained_model.model.state_dict()
    for name, tensor in again.model.state_dict().items():
        assert torch.equal(tensor, ref[name]), name
    other = fit(tiny_frame, replace(tiny_config, seed=1), verbose=False)
    assert other.metrics["loss"] != trained_model.metrics["loss"]


def test_metrics_are_sane(trained_model: TrainResult) -> None:
    m = trained_model.metrics
    assert m["rows_train"] + m["rows_valid"] + m["rows_test"] == 20_000
    assert m["ndcg10_oracle"] == pytest.approx(1.0)
    # the default fusion is the expected utility: through it the truth ranks as the oracle
    assert m["ndcg10_fused_truth"] == pytest.approx(1.0)
    assert 0.0 <= m["ndcg10_random"] <= m["ndcg10_product"] <= 1.0
    # The Poisson head estimates the mean over impressions, so it is calibrated on average.
    assert 0.7 < m["watch_calibration"] < 1.4
    # ECE (10 equal-mass bins) is reported per binary head; a tiny model is roughly calibrated.
    assert 0.0 < m["click_ece"] < 0.1 and 0.0 < m["like_ece"] < 0.05


def test_calibration_recovers_a_known_affine_map(trained_model: TrainResult) -> None:
    model = copy.deepcopy(trained_model.model)
    split = encode_split(trained_model.schema, trained_model.test, model.config.watch_scale)
    with torch.no_grad():  # the raw logits: identity calibration
        model.heads.calibration_scale.fill_(1.0)
        model.heads.calibration_shift.fill_(0.0)
    raw = predict(model, split)
    truth = {"click": (1.7, -0.4), "watch_time": (0.6, 0.3), "like": (0.8, -0.9)}
    # Labels at their exact expectations (soft labels for the binary heads): each head's loss is
    # minimised exactly by the true map, so the fit must recover it.
    for task, (scale, shift) in truth.items():
        z = torch.from_numpy(raw[f"{task}_logit"]) * scale + shift
        split.labels[task] = torch.exp(z) if task == "watch_time" else torch.sigmoid(z)
    fitted = calibrate_heads(model, split)
    assert fitted["click"]["scale"] == pytest.approx(1.7, abs=1e-3)  # click logits vary most
    assert fitted["click"]["shift"] == pytest.approx(-0.4, abs=1e-3)
    # The like logits of a 1-epoch tiny model barely vary, so only the predictions are pinned.
    calibrated = predict(model, split)
    for task in TASKS:
        expected = split.labels[task].numpy() * (
            model.config.watch_scale if task == "watch_time" else 1
        )
        np.testing.assert_allclose(calibrated[task], expected, rtol=1e-3, atol=1e-5)
    assert trained_model.calibration.keys() == set(TASKS)  # fit() calibrates on validation


def test_logged_impression_scores_the_same_online_and_offline(
    tiny_bundle: tuple[Path, str], trained_model: TrainResult
) -> None:
    registry, version = tiny_bundle
    bundle = Registry(registry).bundle(version)
    session = make_session(bundle.onnx_path)
    schema = bundle.schema  # the service's copy of the schema, rebuilt from the manifest
    test = trained_model.test
    for i in (0, 17, len(test) - 1):
        row = test.iloc[i]
        features = {name: row[name] for name in schema.names()}
        user = {k: _plain(features[k]) for k in schema.names("user")}
        context = {k: _plain(features[k]) for k in schema.names("context")}
        items = {k: [_plain(features[k])] for k in schema.names("item")}
        online = run_session(session, schema.encode(user, context, items, 1))
        for task in TASKS:
            offline = trained_model.test_preds[task][i]
            assert abs(online[task][0] - offline) <= 1e-5 * max(1.0, abs(offline)), task


def _plain(value: object) -> object:
    """A JSON-like Python value, as a request body would carry it."""
    return value.item() if isinstance(value, np.generic) else value


def test_gate_diagnostics_in_the_manifest(tiny_bundle: tuple[Path, str]) -> None:
    registry, version = tiny_bundle
    diag = Registry(registry).bundle(version).manifest["gate_diagnostics"]
    assert set(diag["tasks"]) == set(TASKS)
    for task in diag["tasks"].values():
        assert len(task["mean_weights"]) == 4  # small config: 4 experts
        assert sum(task["mean_weights"]) == pytest.approx(1.0, abs=1e-4)
        assert 0.0 <= task["mean_entropy"] <= diag["max_entropy"] + 1e-9
        assert 0.25 <= task["max_mean_share"] <= 1.0


def test_heldout_prediction_distribution_in_the_manifest(
    tiny_bundle: tuple[Path, str], trained_model: TrainResult
) -> None:
    """The drift reference: each task's held-out predictions, binned like the service bins."""
    registry, version = tiny_bundle
    bundle = Registry(registry).bundle(version)
    ref = bundle.reference
    assert ref is not None and ref.same_edges(np.asarray(PREDICTION_EDGES))
    assert ref.rows == len(trained_model.test) and "held-out" in ref.source
    for task in TASKS:
        np.testing.assert_array_equal(
            ref.counts[task], bin_counts(trained_model.test_preds[task], ref.edges)
        )
    history = Registry(registry).history.read()
    assert [(h["action"], h["actor"], h["to"]) for h in history] == [("activate", "cli", version)]


def test_a_collapsed_gate_shows(trained_model: TrainResult) -> None:
    model = copy.deepcopy(trained_model.model)
    assert isinstance(model, MMoE)
    gate = model.gates.logits
    n_experts = model.config.n_experts
    with torch.no_grad():
        for p in (gate.w_user, gate.w_item):
            p.zero_()
        bias = torch.zeros(len(TASKS), n_experts)
        bias[:, 2] = 30.0  # every task's gate sends everything to expert 2
        gate.bias.copy_(bias.reshape(-1))
    split = encode_split(trained_model.schema, trained_model.test, model.config.watch_scale)
    stats = GateStats()
    predict(model, split, stats)
    diag = stats.diagnostics(TASKS)
    healthy = trained_model.gate_diagnostics
    assert healthy is not None
    for task in TASKS:
        assert diag["tasks"][task]["mean_entropy"] < 1e-6
        assert diag["tasks"][task]["max_mean_share"] == pytest.approx(1.0)
        assert healthy["tasks"][task]["mean_entropy"] > 0.5 * math.log(n_experts)


def test_options_are_validated(tmp_path: Path) -> None:
    assert parse_loss_weights("click=2, like=0.5") == {
        "click": 2.0,
        "watch_time": 1.0,
        "like": 0.5,
    }
    for bad in ("dwell=1", "click", "click=-1", "click=nan", "click=x"):
        with pytest.raises(ValueError):
            parse_loss_weights(bad)
    with pytest.raises(ValueError, match="exactly one"):
        run_train(TrainJob(registry=tmp_path))
    with pytest.raises(ValueError, match="version"):
        run_train(TrainJob(registry=tmp_path, simulate=100, version="../x"))


def test_quantize_publishes_an_int8_graph_with_its_auc_check(
    tmp_path: Path, trained_model: TrainResult
) -> None:
    job = TrainJob(registry=tmp_path, simulate=20_000, quantize=True)
    version = publish(trained_model, job, "q8")
    bundle = load_bundle(Registry(tmp_path).version_dir(version))
    q = bundle.manifest["quantization"]
    assert q["int8_bytes"] < q["fp32_bytes"] / 2
    for task in ("click", "like"):
        assert not q[f"{task}_auc_drop"] > 0.002  # NaN (a single class) is allowed through
    graph = bundle.onnx_path.read_bytes()
    assert b"MatMulInteger" in graph or b"DynamicQuantize" in graph
    # The drift reference describes the published (int8) graph's predictions.
    int8 = FrameRequests.of(bundle.schema, trained_model.test).predict(bundle.onnx_path)
    assert bundle.reference is not None
    for task in TASKS:
        np.testing.assert_array_equal(
            bundle.reference.counts[task], bin_counts(int8[task], bundle.reference.edges)
        )
    out = run_session(
        make_session(bundle.onnx_path), random_encoded(bundle.schema, 7, np.random.default_rng(1))
    )
    assert all(np.isfinite(out[t]).all() for t in TASKS)


# -- the steps of fit --------------------------------------------------------------------------


def test_gate_diagnostics_are_those_of_the_restored_weights(
    tiny_frame: pd.DataFrame, trained_model: TrainResult
) -> None:
    """Taken while validating (no extra pass), they equal a pass with the final weights."""
    valid = prepare(tiny_frame).valid
    stats = GateStats()
    predict(trained_model.model, valid, stats)
    assert trained_model.gate_diagnostics == stats.diagnostics(TASKS)


def test_early_stopping_keeps_and_restores_the_best_weights(trained_model: TrainResult) -> None:
    model = copy.deepcopy(trained_model.model)
    stopper = EarlyStopping(model, patience=2)
    assert stopper.observe(1, 1.0) and not stopper.should_stop
    best = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert not stopper.observe(2, 1.5) and not stopper.should_stop  # patience 2: one more
    assert not stopper.observe(3, float("nan")) and stopper.should_stop
    assert stopper.best_epoch == 1 and stopper.best == 1.0
    stopper.restore()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, best[name]), name


def test_train_cli_defaults_are_the_configs() -> None:
    """`vidrank train` without a flag trains what ``TrainConfig()`` names."""
    import typer

    command = typer.main.get_command(app).commands["train"]  # type: ignore[attr-defined]
    defaults = {p.name: p.default for p in command.params}
    config = TrainConfig()
    names = ("interaction_lr", "select_by", "select_each", "interaction_dim", "epochs")
    for name in (*names, "batch_size", "lr"):
        assert defaults[name] == getattr(config, name), name


def test_epoch_loop_runs_hooks_and_stops_early(tiny_frame: pd.DataFrame) -> None:
    config = TrainConfig(small=True, epochs=3, seed=1, batch_size=256, lr=5e-3, select_by="loss")
    data = prepare(tiny_frame.iloc[:4000])
    model = build(config, data.basis)
    seen: list[tuple[int, float]] = []
    halve = lambda epoch, opt: [g.update(lr=g["lr"] / 2) for g in opt.param_groups]  # noqa: E731
    loop = EpochLoop(
        model, config, verbose=False, hooks=[lambda e, o: seen.append((e, 0.0)), halve]
    )
    epochs = loop.run(Shuffled(data.train, config.batch_size), data.valid)
    assert [e for e, _ in seen] == [h["epoch"] for h in epochs.history]
    losses = [h["loss"] for h in epochs.history]
    assert epochs.best_loss == min(losses)
    if len(losses) < config.epochs:  # stopped early: the last epoch did not improve
        assert losses[-1] >= epochs.best_loss
    restored = evaluate_split(predict(model, data.valid), data.valid, config.loss_weights)
    assert restored["loss"] == pytest.approx(epochs.best_loss, rel=1e-6)


def test_select_by_auc_keeps_the_epoch_with_the_best_weighted_auc(tiny_frame: pd.DataFrame) -> None:
    config = TrainConfig(small=True, epochs=3, seed=1, batch_size=256, lr=5e-3, select_by="auc")
    data = prepare(tiny_frame.iloc[:4000])
    model = build(config, data.basis)
    epochs = EpochLoop(model, config, verbose=False).run(
        Shuffled(data.train, config.batch_size), data.valid
    )
    w = config.loss_weights
    scores = [
        sum(w[t] * h[m] for t, m in RANKING_METRICS.items()) / sum(w.values())
        for h in epochs.history
    ]
    kept = int(np.argmax(scores))
    assert selection_value(epochs.history[kept], w, "auc") == pytest.approx(-scores[kept])
    assert epochs.best_loss == epochs.history[kept]["loss"]  # the kept epoch's loss
    restored = evaluate_split(predict(model, data.valid), data.valid, w)
    for metric in RANKING_METRICS.values():
        assert restored[metric] == pytest.approx(epochs.history[kept][metric], abs=1e-6)
    if len(epochs.history) < config.epochs:  # stopped early: the last epoch did not improve
        assert scores[-1] <= max(scores[:-1])


def test_selection_value_and_its_flag() -> None:
    metrics = {"loss": 2.5, "click_auc": 0.7, "watch_xauc": 0.6, "like_auc": 0.8}
    weights = {"click": 2.0, "watch_time": 1.0, "like": 1.0}
    assert selection_value(metrics, weights, "loss") == 2.5
    assert selection_value(metrics, weights, "auc") == pytest.approx(-(1.4 + 0.6 + 0.8) / 4)
    assert TrainConfig().select_by == "auc"  # the default (README section 8)
    assert TrainConfig(arch="mmoe", **variant("mmoe:selloss")[1]).select_by == "loss"
    selauc = TrainConfig(arch="mmoe", **variant("mmoe:intlr2:selauc")[1])
    assert (selauc.select_by, selauc.interaction_lr) == ("auc", 2.0)
    with pytest.raises(ValueError, match="--select-by"):
        TrainConfig(select_by="ndcg")


@pytest.mark.parametrize("arch", [*ARCHS, "ple:levels2"])
def test_every_arch_trains_calibrates_and_exports(
    tmp_path: Path, tiny_frame: pd.DataFrame, arch: str
) -> None:
    arch, *levels = arch.split(":")
    config = TrainConfig(
        arch=arch, small=True, epochs=1, seed=1, interaction_dim=8, ple_levels=2 if levels else 1
    )
    result = fit(tiny_frame, config, verbose=False)
    m = result.metrics
    assert 0.5 < m["click_auc"] < 1.0 and math.isfinite(m["loss"])  # it learnt something
    assert result.calibration.keys() == set(TASKS)
    gated = arch in ("omoe", "mmoe", "ple", "stem")
    assert (result.gate_diagnostics is not None) == gated
    if result.gate_diagnostics is not None:  # one row of weights per task over its own experts
        # small(): PLE 1 shared + 1 own, STEM 1 shared + 1 per task (3 tasks), else 4 experts
        n_gated = {"ple": 2, "stem": 4}.get(arch, 4)
        for task in TASKS:
            weights = result.gate_diagnostics["tasks"][task]["mean_weights"]
            assert len(weights) == n_gated and sum(weights) == pytest.approx(1.0, abs=1e-4)
    path = tmp_path / "m.onnx"
    export_onnx(result.model, result.schema, path)
    checked = parity(result.model, result.schema, path)
    assert checked["max_abs_prob"] <= 1e-5 and checked["max_rel_watch"] <= 1e-4


def test_train_config_checks_every_option(tmp_path: Path) -> None:
    assert TrainConfig(loss_weights={"like": 2.0}).loss_weights == {
        "click": 1.0,
        "watch_time": 1.0,
        "like": 2.0,
    }
    bad = {
        "--arch": {"arch": "moe"},
        "--epochs": {"epochs": 0},
        "--batch-size": {"batch_size": 0},
        "--lr": {"lr": float("inf")},
        "--loss-weights": {"loss_weights": {"dwell": 1.0}},
        "--interactions": {"interactions": ("dots", "cross")},
        "--interaction-dim": {"interaction_dim": 0},
        "--precision": {"precision": "fp16"},
        "--compile": {"compile": "yes"},
    }
    for flag, kwargs in bad.items():
        with pytest.raises(ValueError, match=flag):
            TrainConfig(**kwargs)  # type: ignore[arg-type]
    for flag, kwargs in {
        "--simulate": {"simulate": 5},
        "--nproc": {"simulate": 100, "nproc": 0},
        "--sparse trains in one process": {
            "simulate": 100,
            "nproc": 2,
            "train": TrainConfig(sparse=True),
        },
        "--preset must be one of": {"simulate": 100, "preset": "nope"},
        "--preset names a simulated world": {"data": tmp_path, "preset": "conflicting"},
    }.items():
        with pytest.raises(ValueError, match=flag):
            TrainJob(registry=tmp_path, **kwargs)  # type: ignore[arg-type]
    assert TrainJob(registry=tmp_path, simulate=100).data_description == "simulated:100"
    job = TrainJob(registry=tmp_path, simulate=100, preset="unrelated")
    assert job.data_description == "simulated:100:unrelated"


def test_interactions_option_parses_names_and_none(tiny_frame: pd.DataFrame) -> None:
    assert parse_interactions(" dots, first_order ") == ("dots", "first_order")
    assert parse_interactions("none") == parse_interactions("") == ()
    config = TrainConfig(interactions=("bilinear",), interaction_dim=8)
    net = model_config(config, prepare(tiny_frame).basis)
    assert (net.interactions, net.interaction_dim) == (("bilinear",), 8)


def test_cli_rejects_a_bad_option_before_reading_data(tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    args = ["train", "--registry", str(registry), "--simulate", "100000"]
    for extra, flag in (
        (["--loss-weights", "dwell=1"], "--loss-weights"),
        (["--epochs", "0"], "--epochs"),
        (["--interactions", "dots,dots"], "--interactions"),
    ):
        done = CliRunner().invoke(app, [*args, *extra])
        assert done.exit_code == 2, done.output  # click's usage error, not a traceback
        assert flag in done.output
    assert not registry.exists()


def _steps(model: torch.nn.Module, data: object, config: TrainConfig, starts: list[int]) -> None:
    step, optimizer = Step(FixedWeights(config.loss_weights)), Optimizers(model, config.lr)
    torch.manual_seed(7)  # the same gate-dropout draws for every model
    for start in starts:  # batches of 256 rows: each touches some ids, not others
        step.run(model, data.train.rows(np.arange(start, start + 256)), optimizer)  # type: ignore[attr-defined]


def test_row_wise_tables_train_as_dense_adam_does(tiny_frame: pd.DataFrame) -> None:
    config = TrainConfig(small=True, seed=1, sparse=True, precision="fp32")
    data = prepare(tiny_frame.iloc[:4000])
    rows, dense = build(config, data.basis), build(replace(config, sparse=False), data.basis)
    tables = sparse_tables(rows)
    assert len(tables) >= 2  # the embeddings' and the interaction layer's id tables, at least
    assert sparse_tables(dense) == []  # --dense: every parameter in fused Adam
    table = rows.embedding.tables["user"]
    before = table.weight.detach().clone()
    _steps(rows, data, config, [0])
    touched = torch.zeros(len(before), dtype=torch.bool)
    touched[data.train.inputs["user_cat"][:256].unique()] = True
    changed = (table.weight.detach() != before).any(1)
    assert changed[touched].all() and not changed[~touched].any()
    # Then rows a batch no longer touches keep moving with their moments, as in dense Adam: after
    # the same steps both models hold the same weights.
    _steps(dense, data, config, [0])
    _steps(rows, data, config, [1000, 2000, 0])
    _steps(dense, data, config, [1000, 2000, 0])
    for (name, a), b in zip(rows.named_parameters(), dense.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    assert not torch.equal(table.weight, before)
    assert TrainConfig().sparse is None  # the default: row-wise in one process, dense under DDP


def test_row_form_of_the_interactions_is_the_request_form(trained_model: TrainResult) -> None:
    inter = trained_model.model.interactions
    assert inter is not None
    split = encode_split(trained_model.schema, trained_model.test.iloc[:50], 1.0)
    one = {
        k: v[:1] if k.split("_")[0] in ("user", "context") else v for k, v in split.inputs.items()
    }
    rows = {k: v[:1].expand(50, *v.shape[1:]) if k in one and len(one[k]) == 1 else v
            for k, v in one.items()}  # fmt: skip
    with torch.no_grad():
        (dots_1, terms_1), (dots_n, terms_n) = inter(one), inter(rows)
    assert dots_1 is not None and dots_n is not None and terms_1 is not None
    torch.testing.assert_close(dots_n, dots_1)
    torch.testing.assert_close(terms_n, terms_1)


def test_compiled_parts_train_like_eager_ones_and_are_plain_after(
    tiny_frame: pd.DataFrame,
) -> None:
    config = TrainConfig(small=True, seed=1, compile="on")
    data = prepare(tiny_frame.iloc[:4000])
    eager, fast = build(config, data.basis).eval(), build(config, data.basis).eval()
    parts = list(dense_parts(fast))
    assert {type(p).__name__ for p in parts} >= {"Experts", "Gates", "Towers"}
    batch = data.train.rows(np.arange(512))
    with compiled(fast, True):
        assert all(p._compiled_call_impl is not None for p in parts)
        out_fast = fast(batch[0])
    assert all(p._compiled_call_impl is None for p in parts)
    out_eager = eager(batch[0])
    for task in TASKS:
        torch.testing.assert_close(out_fast[task], out_eager[task], rtol=1e-4, atol=1e-5)


def test_gate_stats_added_in_chunks_are_those_of_the_whole_split() -> None:
    """Validation adds the gate weights chunk by chunk: the diagnostics are the whole split's."""
    gates = np.random.default_rng(0).dirichlet(np.ones(8), size=(1000, 3)).astype(np.float32)
    stats = GateStats()
    for chunk in np.array_split(gates, 7):
        stats.add(chunk)
    g = gates.astype(np.float64)
    entropy = -(g * np.log(g)).sum(-1).mean(0)
    diag = stats.diagnostics(TASKS)
    assert diag["n_rows"] == 1000
    for i, task in enumerate(TASKS):
        assert diag["tasks"][task]["mean_entropy"] == pytest.approx(entropy[i], rel=1e-12)
        assert diag["tasks"][task]["mean_weights"] == pytest.approx(g.mean(0)[i], abs=1e-6)
        assert diag["tasks"][task]["max_mean_share"] == pytest.approx(g.mean(0)[i].max())
    with pytest.raises(ValueError, match="no gate weights"):
        GateStats().diagnostics(TASKS)


def test_bf16_autocast_runs_the_layers_in_bf16_and_trains_like_fp32(
    tiny_frame: pd.DataFrame,
) -> None:
    """``--precision bf16`` runs the forward pass's matmuls in bf16 (their fp32 bias adds promote
    the activations back, so the losses are fp32 and close to fp32's, not equal); ``auto``, the
    default, is bf16 exactly where oneDNN has bf16 kernels."""
    config = TrainConfig(small=True, seed=1)
    assert config.precision == "auto"
    has_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert autocast_dtype("auto") == (torch.bfloat16 if has_bf16 else None)
    assert autocast_dtype("bf16") == torch.bfloat16 and autocast_dtype("fp32") is None
    data = prepare(tiny_frame.iloc[:4000])
    model = build(config, data.basis).eval()
    batch = data.train.rows(np.arange(512))
    weights = FixedWeights(config.loss_weights)
    exact = Step(weights, None).losses(model, batch)
    low = Step(weights, torch.bfloat16).losses(model, batch)
    assert any(not torch.equal(low[t], exact[t]) for t in TASKS)  # bf16 did run
    for task in TASKS:
        assert low[task].dtype == torch.float32
        torch.testing.assert_close(low[task], exact[task], rtol=2e-2, atol=1e-3)


def test_single_task_select_each_keeps_each_networks_own_best_epoch(
    tiny_frame: pd.DataFrame,
) -> None:
    """Separate models, stopped separately: each task's network at the epoch of its own metric."""
    config = TrainConfig(
        arch="single_task", small=True, epochs=4, seed=1, batch_size=256, lr=5e-3, select_each=True
    )
    data = prepare(tiny_frame.iloc[:4000])
    model = build(config, data.basis)
    epochs = EpochLoop(model, config, verbose=False).run(
        Shuffled(data.train, config.batch_size), data.valid
    )
    history = epochs.history

    def own_stop(metric: str) -> int:  # the epoch a model stopped on its own metric keeps
        best = 0
        for i in range(1, len(history)):
            if history[i][metric] <= history[best][metric]:
                break  # patience 1: the first epoch that does not improve ends its training
            best = i
        return best

    kept = {t: own_stop(m) for t, m in RANKING_METRICS.items()}
    # the case that tells the two rules apart: the tasks' own best epochs differ
    assert len(set(kept.values())) > 1, kept
    restored = evaluate_split(predict(model, data.valid), data.valid, config.loss_weights)
    for task, metric in RANKING_METRICS.items():
        assert restored[metric] == pytest.approx(history[kept[task]][metric], abs=1e-6), task
        assert restored[f"loss_{task}"] == pytest.approx(
            history[kept[task]][f"loss_{task}"], rel=1e-5
        )
    assert epochs.best_loss == pytest.approx(restored["loss"], rel=1e-5)
    if len(history) < config.epochs:  # stopped: every task's network had stopped
        assert all(kept[t] < len(history) - 1 for t in RANKING_METRICS)
    assert TrainConfig(arch="single_task", **variant("single_task:own")[1]).select_each
    with pytest.raises(ValueError, match="--select-each"):
        TrainConfig(arch="mmoe", select_each=True)


def test_taskwise_stopping_ignores_a_stopped_networks_later_epochs(
    tiny_frame: pd.DataFrame,
) -> None:
    """A network stopped separately is not trained on: an epoch after its stop is never kept."""
    basis = prepare(tiny_frame.iloc[:2000]).basis
    config = TrainConfig(arch="single_task", small=True, select_each=True)
    stopper = stopping(build(config, basis), config)
    assert not isinstance(stopper, EarlyStopping)
    metrics = ("click_auc", "watch_xauc", "like_auc")
    for epoch, values in enumerate(
        [(0.60, 0.55, 0.60), (0.62, 0.54, 0.61), (0.63, 0.70, 0.60)], start=1
    ):
        assert stopper.observe_record(epoch, dict(zip(metrics, values, strict=True)), config)
        assert not stopper.should_stop  # click still improves
    # watch time stopped after epoch 2; its 0.70 in epoch 3 came after its stop
    assert stopper.best_epochs == {"click": 3, "watch_time": 1, "like": 2}
    assert not stopper.observe_record(4, dict(zip(metrics, (0.61, 0.9, 0.9), strict=True)), config)
    assert stopper.should_stop and stopper.best_epochs["click"] == 3
    joint = TrainConfig(arch="single_task", small=True)  # without --select-each: one epoch
    assert isinstance(stopping(build(joint, basis), joint), EarlyStopping)
