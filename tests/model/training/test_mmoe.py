"""MMoE parts: shapes, dimension checks, gates, the shared-bottom interface and the FLOP count."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from model.core.features import default_schema
from model.core.tasks import TASKS
from model.training.export import random_encoded, random_request
from model.training.layers import (
    WATCH_LOG_RATE_MAX,
    WATCH_LOG_RATE_MIN,
    BatchedLinear,
    Experts,
    FeatureEmbedding,
    Gates,
    Heads,
    Interactions,
    SplitLinear,
    Towers,
    looked_up_l2,
)
from model.training.mmoe import (
    INTERACTIONS,
    MMoE,
    MMoEConfig,
    SharedBottom,
    build_model,
    flops_per_candidate,
    init_output_bias,
)

SCHEMA = default_schema()


def tensors(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in arrays.items()}


def request(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """One request: user/context batch 1, n items."""
    return tensors(random_encoded(SCHEMA, n, np.random.default_rng(seed)))


def tiled(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """The same request with the user/context rows repeated n times (training layout)."""
    user, context, items = random_request(SCHEMA, n, np.random.default_rng(seed))
    columns = {**{k: [v] * n for k, v in {**user, **context}.items()}, **items}
    return tensors(SCHEMA.encode_rows(columns, n))


@pytest.fixture(scope="module")
def model() -> MMoE:
    torch.manual_seed(0)
    return MMoE(MMoEConfig.small(), SCHEMA).eval()


@pytest.mark.parametrize("n", [1, 7])
def test_output_shapes_for_request_and_training_layouts(model: MMoE, n: int) -> None:
    cfg = model.config
    for inputs, user_batch in ((request(n), 1), (tiled(n), n)):
        out = model(inputs, return_gates=True)
        for task in TASKS:
            assert out[task].shape == (n,) and out[f"{task}_logit"].shape == (n,)
        assert out["gates"].shape == (n, len(TASKS), cfg.n_experts)
        u, v, terms = model.shared_input(inputs)
        assert u.shape == (user_batch, model.embedding.user_dim)
        assert v.shape == (n, model.embedding.item_dim + 6 * 5)  # the 30 field dots appended
        assert terms is not None and terms.shape == (n, len(TASKS))
        assert model.experts(u, v).shape == (cfg.n_experts, n, cfg.expert_hidden[-1])


def test_user_side_broadcast_equals_tiled_rows(model: MMoE) -> None:
    with torch.no_grad():
        once, tiled_out = model(request(9)), model(tiled(9))
    for task in TASKS:
        torch.testing.assert_close(once[task], tiled_out[task], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["mmoe", "ple", "stem", "shared_bottom"])
def test_training_forms_compute_what_the_exported_forms_do(
    arch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The experts' first layer, ``mix``, the batched layers and the table lookups each have a
    faster form for training rows and keep the traced (exported) form; both give the same
    outputs and the same gradients."""
    torch.manual_seed(0)
    net = build_model(MMoEConfig.small(arch=arch, gate_dropout=0.0), SCHEMA).train()
    inputs = tiled(11, seed=3)

    def outputs_and_grads(tracing: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        monkeypatch.setattr(torch.jit, "is_tracing", lambda: tracing)
        net.zero_grad()
        out = net(inputs)
        sum(out[f"{t}_logit"].sum() for t in TASKS).backward()
        grads = [p.grad.clone() for p in net.parameters() if p.grad is not None]
        return [out[f"{t}_logit"].detach() for t in TASKS], grads

    (fast, fast_grads), (traced, traced_grads) = outputs_and_grads(False), outputs_and_grads(True)
    for a, b in zip(fast + fast_grads, traced + traced_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert len(fast_grads) == len(list(net.parameters()))


def test_entire_space_heads_chain_every_task_with_the_click() -> None:
    # like = p_click * p_like|click and watch = p_click * rate|click, over any logit magnitude
    heads = Heads(TASKS, watch_scale=4.0, entire_space=True)
    a, w, b = (torch.linspace(-40, 40, 81, dtype=torch.float64)[torch.randperm(81)] for _ in "awb")
    with torch.no_grad():
        out = heads(torch.stack([a, w, b]))
    expected_like = torch.sigmoid(a) * torch.sigmoid(b)
    torch.testing.assert_close(out["like"], expected_like, rtol=1e-9, atol=1e-300)
    log_watch = torch.log(torch.sigmoid(a)) + w
    clamped = log_watch.clamp(WATCH_LOG_RATE_MIN, WATCH_LOG_RATE_MAX)
    torch.testing.assert_close(out["watch_time"], 4.0 * torch.exp(clamped), rtol=1e-9, atol=0)
    torch.testing.assert_close(out["click"], torch.sigmoid(a))
    assert torch.isfinite(out["like_logit"]).all() and (out["like"] <= out["click"]).all()
    independent = Heads(TASKS, watch_scale=4.0)(torch.stack([a, w, b]))
    assert not torch.allclose(independent["like"], out["like"])  # the flag changes the heads


def test_entire_space_models_start_at_the_base_rates() -> None:
    rates = {"click": 0.3, "watch_time": 6.0, "like": 0.02}
    torch.manual_seed(0)
    model = build_model(MMoEConfig.small(watch_scale=5.0, entire_space=True), SCHEMA).eval()
    for module in model.modules():  # silence everything but the output biases
        if isinstance(module, Interactions):
            for p in module.parameters():
                torch.nn.init.zeros_(p)
    for tower_layer in model.towers.batched_layers():
        torch.nn.init.zeros_(tower_layer.weight)
    init_output_bias(model, rates)
    with torch.no_grad():
        out = model(request(5))
    for task, rate in rates.items():
        torch.testing.assert_close(out[task], torch.full((5,), rate), rtol=1e-5, atol=0)


def test_heads_ranges(model: MMoE) -> None:
    with torch.no_grad():
        out = model(request(50))
    for task in ("click", "like"):
        assert ((out[task] > 0) & (out[task] < 1)).all()
    assert (out["watch_time"] > 0).all() and torch.isfinite(out["watch_time"]).all()


@pytest.mark.parametrize(
    "make",
    [
        lambda: Experts(0, 5, 2, (4,)),
        lambda: Experts(3, 5, 0, (4,)),
        lambda: Experts(3, 5, 2, ()),
        lambda: Experts(3, 5, 2, (4, 0)),
        lambda: Gates(3, 5, 0, 2),
        lambda: Gates(3, 5, 3, 2, temperature=0.0),
        lambda: Gates(3, 5, 3, 2, dropout=1.0),
        lambda: Towers(0, (4,), 3),
        lambda: Towers(8, (0,), 3),
        lambda: SplitLinear(3, 0, 4),
        lambda: BatchedLinear(2, 3, 0),
        lambda: FeatureEmbedding(SCHEMA, 0),
        lambda: MMoEConfig(n_experts=0),
        lambda: MMoEConfig(arch="transformer"),
        lambda: MMoEConfig(tasks=("click", "dwell")),
        lambda: MMoEConfig(watch_scale=0.0),
        lambda: MMoEConfig(expert_hidden=()),
        lambda: MMoEConfig(interactions=("cross",)),
        lambda: MMoEConfig(interactions=("dots", "dots")),
        lambda: MMoEConfig(interaction_dim=0),
        lambda: MMoEConfig(arch="single_task", entire_space=True),
        lambda: MMoEConfig(tasks=("like", "watch_time"), entire_space=True),
    ],
)
def test_bad_dimensions_raise_value_error(make) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError):
        make()


def test_mismatched_batches_and_missing_inputs_raise(model: MMoE) -> None:
    inputs = request(7)
    inputs["user_cat"] = inputs["user_cat"].repeat(3, 1)  # B_u = 3 is neither 1 nor N
    with pytest.raises(ValueError, match="user_cat"):
        model(inputs)
    inputs = request(7)
    del inputs["item_num"]
    with pytest.raises(ValueError, match="item_num"):
        model(inputs)


def test_gate_rows_sum_to_one_with_and_without_dropout() -> None:
    torch.manual_seed(0)
    gates = Gates(6, 5, 3, 8, temperature=0.7, dropout=0.5)
    u, v = torch.randn(1, 6), torch.randn(200, 5)
    for training in (False, True):
        g = gates.train(training)(u, v)
        assert g.shape == (200, 3, 8)
        torch.testing.assert_close(g.sum(-1), torch.ones(200, 3))
    # In training about half the experts are dropped: exactly zero weight, never all of them.
    dropped = (g == 0).float().mean().item()
    assert 0.4 < dropped < 0.6
    assert (g.max(-1).values > 0).all()


def test_shared_bottom_has_the_same_interface(model: MMoE) -> None:
    torch.manual_seed(0)
    baseline = SharedBottom(MMoEConfig.small(arch="shared_bottom"), SCHEMA).eval()
    assert isinstance(build_model(baseline.config, SCHEMA), SharedBottom)
    for inputs in (request(5), tiled(5)):
        out, ref = baseline(inputs), model(inputs)
        assert set(out) == set(ref)
        assert all(out[k].shape == ref[k].shape for k in out)


def test_config_round_trips_through_json() -> None:
    cfg = MMoEConfig(watch_scale=7.5, gate_dropout=0.2)
    assert MMoEConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown"):
        MMoEConfig.from_dict({**cfg.to_dict(), "n_layers": 3})


def test_flops_of_the_default_config() -> None:
    # Default schema, embedding dim 16: D_u = 3*16 + 3 (user) + 3*16 (context) = 99,
    # D_i = 4*16 + 1*16 (tag) + 2 = 82. E = 8 experts of (256, 128), T = 3, towers (64,).
    # Interactions (width k = 32) between F_u = 6 user/context fields (user_id, activity, author
    # flag, hour, weekday, tab) and F_i = 5 item fields (video, author, type, music, tag):
    # 30 dots join the item side, d = 99 + 82 + 30 = 211.
    d_u, d_i, e, t, f_u, f_i, k = 99, 82 + 30, 8, 3, 6, 5, 32
    d = d_u + d_i
    interactions = f_u * f_i * k + t * f_i * k  # dots, bilinear item side
    macs = d * e * 256 + e * 256 * 128 + d * t * e + t * e * 128 + t * (128 * 64 + 64 * 1)
    cfg = MMoEConfig()
    assert flops_per_candidate(cfg, SCHEMA) == 2 * (macs + interactions + t * f_u * f_i * k)
    # With the user side computed once per request, its terms drop out of the per-candidate cost
    # (the user rows of the first layers and gates, and the bilinear user side q).
    amortised = 2 * (macs - d_u * e * 256 - d_u * t * e + interactions)
    assert flops_per_candidate(cfg, SCHEMA, user_side_once=True) == amortised
    # Without interactions the item side has no dots (d_i = 82): the same formula, and the
    # interaction layer's whole serving cost stays within 15 % of that plain model's.
    d_plain = d_u + 82
    plain_macs = macs - (d - d_plain) * (e * 256 + t * e)
    plain_amortised = 2 * (plain_macs - d_u * e * 256 - d_u * t * e)
    plain = MMoEConfig(interactions=())
    assert flops_per_candidate(plain, SCHEMA, user_side_once=True) == plain_amortised
    assert amortised / plain_amortised < 1.15
    baseline = flops_per_candidate(MMoEConfig(arch="shared_bottom"), SCHEMA)
    assert 0.8 < baseline / (2 * macs) < 1.2  # "comparable size"


def test_interactions_equal_their_definitions() -> None:
    torch.manual_seed(0)
    layer = Interactions(SCHEMA, 3, 4, dots=True, bilinear=True, first_order=True)
    for p in layer.parameters():
        torch.nn.init.normal_(p)
    inputs = tiled(6)
    a, b = layer.sides(inputs)  # N x F_u x k, N x F_i x k
    assert a.shape == (6, 6, 4) and b.shape == (6, 5, 4)
    dots, terms = layer(inputs)
    assert dots is not None and terms is not None
    r, expected_dots = layer.pair_weights, torch.empty(6, 5, 6)
    expected_terms = torch.zeros(6, 3)
    for n, g, f in itertools.product(range(6), range(5), range(6)):
        expected_dots[n, g, f] = a[n, f] @ b[n, g]
        expected_terms[n] += (r[:, f, g] * a[n, f] * b[n, g]).sum(-1)
    for e in ("user", "context", "item"):  # first order: one learnt scalar per task and id
        wide = layer.wide[e].weight
        lay = SCHEMA.layout(e)
        if lay.cat:
            expected_terms += wide[inputs[f"{e}_cat"]].sum(1)
        if lay.multi:
            pooled = wide[inputs[f"{e}_multi"]] * inputs[f"{e}_multi_w"].unsqueeze(-1)
            expected_terms += pooled.sum((1, 2))
    torch.testing.assert_close(dots, expected_dots.flatten(1))
    torch.testing.assert_close(terms, expected_terms, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kinds", [(), ("dots",), ("bilinear",), ("first_order",), INTERACTIONS])
def test_each_interaction_kind_broadcasts_the_user_side(kinds: tuple[str, ...]) -> None:
    torch.manual_seed(0)
    model = MMoE(MMoEConfig.small(interactions=kinds), SCHEMA).eval()
    assert (model.interactions is None) == (not kinds)
    if model.interactions is not None:
        for p in model.interactions.parameters():
            torch.nn.init.normal_(p, std=0.3)
    with torch.no_grad():
        once, tiled_out = model(request(9)), model(tiled(9))
    for task in TASKS:
        torch.testing.assert_close(once[task], tiled_out[task], rtol=1e-5, atol=1e-6)


def test_two_extraction_levels_wire_each_task_to_its_own_level_one_output() -> None:
    """PLE, two levels: task t's level-2 gate reads task t's level-1 mixture (changing it moves
    task t alone), the shared experts at level 2 read the shared mixture (changing its gate moves
    every task); the user side still broadcasts, and the cost is CGC's plus the shared gate and
    the level-2 gates and mixtures."""
    torch.manual_seed(0)
    cfg = MMoEConfig.small(arch="ple", ple_levels=2)
    net = build_model(cfg, SCHEMA).eval()
    x = request(9)
    with torch.no_grad():
        base = net(x, return_gates=True)
        s, k, t = cfg.shared_experts, cfg.task_experts, len(cfg.tasks)
        assert base["gates"].shape == (9, t, s + k)
        torch.testing.assert_close(net(tiled(9))["click"], base["click"], rtol=1e-5, atol=1e-6)
        net.upper_gates.weight[0, :, 0] += 1.0  # task 0's level-2 gate
        moved = net(x)
        net.upper_gates.weight[0, :, 0] -= 1.0
        net.shared_gate.logits.w_item[:, 0] += 1.0  # the level-1 shared gate
        shared = net(x)
    first, *others = cfg.tasks
    assert not torch.allclose(moved[f"{first}_logit"], base[f"{first}_logit"])
    for task in others:
        torch.testing.assert_close(moved[f"{task}_logit"], base[f"{task}_logit"])
    for task in cfg.tasks:
        assert not torch.allclose(shared[f"{task}_logit"], base[f"{task}_logit"])
    # Default network: d = 211 (112 with the user side once), E = 2 + 3*2 = 8 experts, K = 4.
    default, two = MMoEConfig(arch="ple"), MMoEConfig(arch="ple", ple_levels=2)
    e, kk, h1 = 8, 4, 256
    for once, d in ((False, 211), (True, 112)):
        extra = 2 * (d * e + e * h1 + 2 * 3 * kk * h1)
        got = flops_per_candidate(two, SCHEMA, user_side_once=once)
        assert got - flops_per_candidate(default, SCHEMA, user_side_once=once) == extra
    with pytest.raises(ValueError, match="two extraction levels"):
        MMoEConfig(arch="mmoe", ple_levels=2)
    with pytest.raises(ValueError, match="two extraction levels"):
        MMoEConfig(arch="ple", ple_levels=2, expert_hidden=(64,))
    with pytest.raises(ValueError, match="ple_levels"):
        MMoEConfig(arch="ple", ple_levels=3)


@pytest.mark.parametrize("arch", ["mmoe", "stem", "single_task"])
def test_looked_up_l2_is_the_squared_norm_of_the_rows_a_batch_reads(arch: str) -> None:
    torch.manual_seed(0)
    net = build_model(MMoEConfig.small(arch=arch), SCHEMA)
    inputs = tiled(6)
    penalty = looked_up_l2(net, inputs)
    by_hand, tables = 0.0, 0
    for module in net.modules():
        if isinstance(module, FeatureEmbedding | Interactions):
            for entity, table in (t for d in module.id_tables() for t in d.items()):
                tables += 1
                weight, lay = table.weight.detach(), module.layouts[entity]
                for n in range(6):
                    rows = [weight[inputs[f"{entity}_cat"][n]]] if lay.cat else []
                    if lay.multi:
                        w = inputs[f"{entity}_multi_w"][n].unsqueeze(-1)
                        rows.append((weight[inputs[f"{entity}_multi"][n]] * w).sum(1))
                    by_hand += float(sum(r.pow(2).sum() for r in rows)) / 6
    # per entity (user, context, item): each embedding set's table, the interaction table and
    # the first-order weights; STEM has 4 embedding sets, single_task 3 whole models
    assert tables == {"mmoe": 9, "stem": 18, "single_task": 27}[arch]
    assert float(penalty.detach()) == pytest.approx(by_hand, rel=1e-5)
    penalty.backward()
    user = net.embedding.tables["user"] if arch != "single_task" else None
    if user is not None:  # only the rows the batch looked up get a gradient
        assert user.weight.grad is not None
        touched = torch.zeros(len(user.weight), dtype=torch.bool)
        touched[inputs["user_cat"].unique()] = True
        has_grad = (user.weight.grad != 0).any(1)
        assert has_grad[touched].all() and not has_grad[~touched].any()
