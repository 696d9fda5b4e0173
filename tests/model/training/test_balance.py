"""Multi-task levers: loss balancing, STEM's task-specific backward, the gradient diagnostics."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from model.core.features import default_schema
from model.core.tasks import TASKS
from model.training.analysis.experiment import variant
from model.training.analysis.transfer import gradient_report, report_lines
from model.training.balance import (
    FixedWeights,
    GradNormWeights,
    UncertaintyWeights,
    loss_floor,
    make_balance,
    shared_parameters,
)
from model.training.batches import make_batches
from model.training.config import TrainConfig, parse_loss_weights
from model.training.fit import fit, network_config, prepare
from model.training.loop import (
    Optimizers,
    interaction_tables,
    sparse_tables,
    use_sparse_tables,
)
from model.training.mmoe import MMoEConfig, build_model
from model.training.objective import task_losses, weighted_sum

WEIGHTS = dict.fromkeys(TASKS, 1.0)


@pytest.fixture(scope="module")
def batch(tiny_frame: pd.DataFrame):  # type: ignore[no-untyped-def]
    data = prepare(tiny_frame)
    return next(make_batches(data.train, 512, np.random.default_rng(0))), data.basis


def _model(arch: str, basis):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)  # no gate dropout: two forward passes of a batch give the same losses
    cfg = MMoEConfig.small(
        arch=arch, watch_scale=basis.watch_scale, interaction_dim=8, gate_dropout=0.0
    )
    return build_model(cfg, basis.schema)


def test_fixed_weights_is_the_weighted_sum(batch) -> None:  # type: ignore[no-untyped-def]
    (inputs, labels), basis = batch
    losses = task_losses(_model("mmoe", basis)(inputs), labels)
    weights = {"click": 1.0, "watch_time": 0.5, "like": 2.0}
    assert torch.equal(FixedWeights(weights).combine(losses, labels), weighted_sum(losses, weights))


def test_the_poisson_floor_is_the_loss_of_a_perfect_prediction() -> None:
    y = torch.tensor([0.0, 0.5, 2.0, 7.0])
    perfect = torch.nn.functional.poisson_nll_loss(torch.log(y.clamp_min(1e-30)), y, log_input=True)
    assert float(loss_floor("watch_time", y)) == pytest.approx(float(perfect), abs=1e-5)
    assert float(loss_floor("click", torch.tensor([0.0, 1.0]))) == 0.0


def test_uncertainty_weights_learn_the_inverse_loss() -> None:
    balance = UncertaintyWeights(WEIGHTS)
    labels = {t: torch.zeros(4) for t in TASKS}  # floors 0: the losses are what is above them
    losses = {
        "click": torch.tensor(0.5),
        "watch_time": torch.tensor(2.0),
        "like": torch.tensor(0.1),
    }
    opt = torch.optim.Adam(balance.trainable(), lr=0.05)
    for _ in range(600):
        opt.zero_grad()
        balance.combine(losses, labels).backward()
        opt.step()
    for task, loss in losses.items():  # the optimum of exp(-s) L + s is exp(-s) = 1 / L
        assert balance.weights()[task] == pytest.approx(1.0 / float(loss), rel=0.05)


def test_gradnorm_equalises_the_task_gradient_norms_on_shared_parameters(batch) -> None:  # type: ignore[no-untyped-def]
    (inputs, labels), basis = batch
    model = _model("mmoe", basis)
    balance = make_balance("gradnorm", model, WEIGHTS)
    assert isinstance(balance, GradNormWeights)
    before = balance._task_norms((inputs, labels))
    assert max(before.values()) / min(before.values()) > 2  # the imbalance it is there for
    balance.before_step((inputs, labels))
    weighted = {t: balance.weights()[t] * n for t, n in before.items()}
    assert max(weighted.values()) / min(weighted.values()) == pytest.approx(1.0, abs=1e-4)
    assert sum(balance.weights().values()) == pytest.approx(len(TASKS))
    assert all(p.grad is None for p in model.parameters())  # measuring leaves no gradient behind


def test_stem_tasks_reach_only_their_own_and_the_shared_parameters(batch) -> None:  # type: ignore[no-untyped-def]
    (inputs, labels), basis = batch
    model = _model("stem", basis)
    model.train()
    cfg = model.config
    s, k = cfg.shared_experts, cfg.task_experts
    for t, task in enumerate(TASKS):
        model.zero_grad(set_to_none=True)
        task_losses(model(inputs), labels)[task].backward()
        for other, emb in enumerate(model.task_embeddings):
            grad = [p.grad for p in emb.parameters() if p.grad is not None]
            touched = any(float(g.abs().sum()) > 0 for g in grad)
            assert touched == (other == t), (task, other)
        for group, experts in enumerate(model.experts):  # 0 = the shared experts
            touched = any(
                p.grad is not None and float(p.grad.abs().sum()) > 0 for p in experts.parameters()
            )
            assert touched == (group in (0, t + 1)), (task, group)
    assert len(model.experts) == 1 + len(TASKS) and s + len(TASKS) * k == 4
    # All forward: training computes what the exported (eval) graph does.
    with torch.no_grad():
        train_out = model(inputs)
        model.eval()
        eval_out = model(inputs)
    for task in TASKS:
        torch.testing.assert_close(train_out[task], eval_out[task])


def test_gradient_report_names_groups_and_leaves_the_model_unchanged(batch) -> None:  # type: ignore[no-untyped-def]
    (inputs, labels), basis = batch
    model = _model("mmoe", basis)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = gradient_report(model, [(inputs, labels)] * 2)
    assert report["batches"] == 2
    groups = report["groups"]
    assert {"embeddings", "interaction tables", "experts", "gates"} <= set(groups)
    for name, g in groups.items():
        assert set(g["norm"]) == set(TASKS) and all(v > 0 for v in g["norm"].values()), name
        assert all(-1.0 <= c <= 1.0 for c in g["cosine"].values()), name
    assert groups["gates"]["cosine"] == {}  # a gate per task: nothing shared to compare
    assert len(groups["experts"]["cosine"]) == 3
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(p.grad is None for p in model.parameters())
    assert report_lines(report)[0].startswith("| group | params |")
    assert set(shared_parameters(model)) <= set(model.parameters())


@pytest.mark.parametrize("balance", ["uncertainty", "gradnorm"])
def test_a_balanced_run_trains_and_reports_with_the_fixed_weights(
    tiny_frame: pd.DataFrame, balance: str
) -> None:
    config = TrainConfig(arch="stem", small=True, epochs=1, seed=1, interaction_dim=8,
                         loss_balance=balance)  # fmt: skip
    result = fit(tiny_frame.iloc[:8000], config, verbose=False)  # a few steps show it trains
    assert 0.5 < result.metrics["click_auc"] < 1.0
    # The reported loss is the fixed-weight sum whatever trained the model (the recipe's
    # weights: click 4, the others 1).
    assert config.loss_weights == {"click": 4.0, "watch_time": 1.0, "like": 1.0}
    assert result.metrics["loss"] == pytest.approx(
        sum(config.loss_weights[t] * result.metrics[f"loss_{t}"] for t in TASKS), rel=1e-5
    )


def test_an_unknown_balance_names_the_flag() -> None:
    with pytest.raises(ValueError, match="--loss-balance"):
        TrainConfig(loss_balance="magic")
    with pytest.raises(ValueError, match="--loss-balance"):
        make_balance("magic", build_model(MMoEConfig.small(), default_schema()), WEIGHTS)


def test_each_architecture_brings_its_own_recipe_unless_told() -> None:
    for mixture in ("omoe", "mmoe", "ple", "stem"):  # every mixture of experts: the recipe
        config = TrainConfig(arch=mixture)
        recipe = (config.loss_balance, config.gate_temperature, config.shared_lr)
        assert recipe == ("gradnorm", 0.1, pytest.approx(3**0.5)), mixture
        assert config.loss_weights == {"click": 4.0, "watch_time": 1.0, "like": 1.0}, mixture
    assert TrainConfig().arch == "mmoe" and TrainConfig().loss_balance == "gradnorm"
    for baseline in ("single_task", "shared_bottom"):  # no gates: fixed weights and one rate
        config = TrainConfig(arch=baseline)
        assert (config.loss_balance, config.gate_temperature, config.shared_lr) == ("fixed", 1, 1)
        assert config.loss_weights == dict.fromkeys(TASKS, 1.0), baseline
    paper = TrainConfig(arch="mmoe", **variant("mmoe:paper")[1])
    assert (paper.loss_balance, paper.gate_temperature) == ("fixed", 1.0)  # Ma et al.'s MMoE
    assert paper.loss_weights == dict.fromkeys(TASKS, 1.0)
    assert TrainConfig(arch="mmoe", **variant("mmoe:even")[1]).loss_weights["click"] == 1.0
    baseline = TrainConfig(arch="shared_bottom", **variant("shared_bottom:click2")[1])
    assert baseline.loss_weights["click"] == 2.0 and baseline.loss_balance == "fixed"
    # the recipe's weight before README section 11, and today's, as options
    assert TrainConfig(arch="mmoe", **variant("mmoe:click2")[1]).loss_weights == {
        "click": 2.0, "watch_time": 1.0, "like": 1.0,
    }  # fmt: skip
    assert variant("shared_bottom:click4")[1]["loss_weights"] == TrainConfig().loss_weights
    # like's weight beside the recipe's click (README section 11)
    assert TrainConfig(arch="mmoe", **variant("mmoe:like2")[1]).loss_weights == {
        "click": 4.0, "watch_time": 1.0, "like": 2.0,
    }  # fmt: skip
    told = TrainConfig(arch="stem", loss_balance="fixed", gate_temperature=1.0)
    assert (told.loss_balance, told.gate_temperature) == ("fixed", 1.0)
    # weights told replace the recipe's: tasks not named weigh 1
    assert TrainConfig(arch="mmoe", loss_weights={"like": 2.0}).loss_weights == {
        "click": 1.0, "watch_time": 1.0, "like": 2.0,
    }  # fmt: skip
    assert parse_loss_weights("") == {} and TrainConfig(loss_weights={}).loss_weights["click"] == 4
    with pytest.raises(ValueError, match="--gate-temperature"):
        TrainConfig(gate_temperature=0.0)


def test_gate_dropout_reaches_the_network_and_is_an_experiment_option() -> None:
    assert network_config(TrainConfig(), 1.0).gate_dropout == 0.1  # the default
    assert network_config(TrainConfig(gate_dropout=0.0), 1.0).gate_dropout == 0.0
    assert variant("mmoe:nodrop") == ("mmoe", {"gate_dropout": 0.0})
    assert variant("mmoe:drop25") == ("mmoe", {"gate_dropout": 0.25})
    with pytest.raises(ValueError, match="--gate-dropout"):
        TrainConfig(gate_dropout=1.0)


def test_expert_count_reaches_the_network_and_is_an_experiment_option() -> None:
    assert network_config(TrainConfig(), 1.0).n_experts == 8  # the network's own
    assert network_config(TrainConfig(small=True), 1.0).n_experts == 4
    assert network_config(TrainConfig(experts=16), 1.0).n_experts == 16
    assert network_config(TrainConfig(small=True, experts=2), 1.0).n_experts == 2
    assert variant("mmoe:e4") == ("mmoe", {"experts": 4})
    assert variant("omoe:e16") == ("omoe", {"experts": 16})
    with pytest.raises(ValueError, match="--experts"):
        TrainConfig(experts=0)


def test_shared_parameters_learn_at_their_multiple_of_the_rate(batch) -> None:  # type: ignore[no-untyped-def]
    # Adam's first step moves every entry with a gradient by lr * g / (|g| + eps) ~ lr: the
    # shared parameters (embeddings, interaction tables, experts) by shared_lr times that.
    (inputs, labels), basis = batch
    model = _model("mmoe", basis)
    use_sparse_tables(model)  # the tables' rows go through ActiveRowAdam's groups as well
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    shared = {id(p) for p in shared_parameters(model)}
    optimizer = Optimizers(model, lr=1e-3, shared_lr=3.0)
    weighted_sum(task_losses(model(inputs), labels), WEIGHTS).backward()
    optimizer.step()
    assert any(id(p) in shared for p in sparse_tables(model))
    for name, p in model.named_parameters():
        moved = float((p.detach() - before[name]).abs().max())
        assert moved == pytest.approx(3e-3 if id(p) in shared else 1e-3, rel=1e-3), name
    # Scaling the rate by an epoch hook keeps the multiple.
    assert sorted({g["lr"] for g in optimizer.param_groups}) == pytest.approx([1e-3, 3e-3])


@pytest.mark.parametrize("arch", ["mmoe", "single_task"])
def test_interaction_tables_learn_at_their_multiple_on_top_of_the_shared_one(batch, arch) -> None:  # type: ignore[no-untyped-def]
    (inputs, labels), basis = batch
    model = _model(arch, basis)
    use_sparse_tables(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    shared = {id(p) for p in shared_parameters(model)}
    fast = {id(p) for p in interaction_tables(model)}
    assert fast and fast <= {id(p) for p in sparse_tables(model)}  # field vectors, first order
    optimizer = Optimizers(model, lr=1e-3, shared_lr=2.0, interaction_lr=3.0)
    weighted_sum(task_losses(model(inputs), labels), WEIGHTS).backward()
    optimizer.step()
    for name, p in model.named_parameters():
        expected = 1e-3 * (2.0 if id(p) in shared else 1.0) * (3.0 if id(p) in fast else 1.0)
        moved = float((p.detach() - before[name]).abs().max())
        assert moved == pytest.approx(expected, rel=1e-3), name
    assert TrainConfig().interaction_lr == 2.0  # the default (README section 8)
    assert TrainConfig(arch="mmoe", **variant("mmoe:intlr1")[1]).interaction_lr == 1.0
    assert TrainConfig(arch="mmoe", **variant("mmoe:intlr3")[1]).interaction_lr == 3.0
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="--interaction-lr"):
            TrainConfig(interaction_lr=bad)


def test_the_recipe_gives_shared_parameters_sqrt_tasks_times_the_rate() -> None:
    assert TrainConfig().shared_lr == pytest.approx(len(TASKS) ** 0.5)
    assert TrainConfig(arch="stem").shared_lr == pytest.approx(len(TASKS) ** 0.5)
    assert TrainConfig(arch="shared_bottom").shared_lr == 1.0
    assert TrainConfig(arch="mmoe", **variant("mmoe:paper")[1]).shared_lr == 1.0
    assert TrainConfig(arch="mmoe", **variant("mmoe:onelr")[1]).shared_lr == 1.0
    with pytest.raises(ValueError, match="--shared-lr"):
        TrainConfig(shared_lr=0.0)
