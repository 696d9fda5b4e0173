"""The ranking architectures (torch), all on the same input and the same heads.

``--arch`` picks one of ``ARCHS``:

``single_task``  one independent shared-bottom model per task (nothing shared but the loop);
``shared_bottom`` one MLP shared by all tasks, a tower per task;
``omoe``          experts mixed by one gate shared by all tasks (the MMoE paper's baseline);
``mmoe``          Multi-gate Mixture-of-Experts (Ma et al., KDD 2018): a gate per task;
``ple``           PLE/CGC (Tang et al., RecSys 2020): shared experts plus experts of each task's
                  own; each task's gate mixes its own and the shared ones (one extraction level).
``stem``          MMoE with task-specific embeddings (STEM-Net, Su et al., AAAI 2024): shared
                  embeddings plus a set of each task's own; shared experts read the shared set,
                  a task's experts its own; each task's gate (on its own set) mixes every expert,
                  but a task's loss reaches only the shared experts and its own ("all forward,
                  task-specific backward").

Every one starts from ``FeatureEmbedding`` + ``Interactions`` and ends in per-task logits
(plus the interactions' task terms) -> ``Heads``. The network is built from named parts
(model/training/layers.py), each shape-checked at construction:

``FeatureEmbedding``
    the schema's encoded inputs -> a user-side vector ``u`` [B_u, D_u] (user + context) and an
    item-side vector ``v`` [N, D_i]. B_u = 1 at serving (one request) and N in training.
``Interactions``
    explicit user-side x item-side field interactions (dots, per-task bilinear terms,
    first-order terms), the user side computed once per request.
``Experts``
    E ReLU MLPs. Their first layers are fused into one matmul that is split by input side,
    ``h1 = relu(u @ W_u + v @ W_v + b)``: when B_u = 1 the user row broadcasts over the N
    candidates, so the user/context part of the first layer -- the largest matmul of the network --
    is computed once per request instead of once per candidate. Deeper layers run as one batched
    matmul over experts; activations are expert-major, E x N x H.
``Gates``
    per gate g, ``softmax(W_g [u, v] / temperature)`` over its experts, with the same user/item
    split. In training, experts are dropped from the gate (probability ``gate_dropout``) and the
    rest renormalised: YouTube saw gates polarise onto one expert in ~20% of runs and used 10%
    expert dropout against it, which is the default here.
``Towers``
    one MLP per task (held as batched weights) mapping the task's expert mixture to a logit.
``Heads``
    logits -> predictions over the whole impression space: click and like are sigmoids; watch
    time is ``watch_scale * exp(logit)`` with the log-rate clamped.

Why a Poisson head for watch time: the label is seconds watched per impression, 0 for a
non-click, so it is a zero-inflated, heavy-tailed target. The trainer fits
``watch_s / watch_scale`` with the Poisson negative log-likelihood under a log link. That loss
is a proper scoring rule for the mean: its expected value ``E[mu - y log mu | x]`` is minimised
exactly at ``mu = E[y | x]``, whatever the distribution of y (it need not be Poisson, nor
integer). The output is therefore the conditional mean ``E[watch seconds | x]``, which is what a
utility that adds up expected engagement needs. MSE on ``log1p(watch)`` would instead estimate
``E[log1p(y) | x]``, i.e. a geometric-type mean, which is biased low for skewed targets and
collapses toward 0 on the many zero rows.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from itertools import pairwise
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F  # noqa: N812 -- the conventional alias

from model.core.features import ENTITIES, EntityLayout, FeatureSchema
from model.core.tasks import TASKS
from model.training.layers import (
    BINARY_TASKS,
    CLICK,
    POISSON_TASKS,
    BatchedLinear,
    Experts,
    FeatureEmbedding,
    Gates,
    Heads,
    Interactions,
    SplitLinear,
    Towers,
    entity_width,
    gate_softmax,
    n_fields,
    positive_dims,
)

ARCHS: tuple[str, ...] = ("single_task", "shared_bottom", "omoe", "mmoe", "ple", "stem")
INTERACTIONS: tuple[str, ...] = ("dots", "bilinear", "first_order")
# All three: on held-out data they beat any subset for MMoE (README "Model quality").
DEFAULT_INTERACTIONS: tuple[str, ...] = INTERACTIONS


@dataclass(frozen=True)
class MMoEConfig:
    """Architecture hyper-parameters; stored in the bundle manifest so a bundle describes itself.

    ``bottom_hidden`` sizes the shared-bottom baseline: (768, 512) costs about the same multiply-
    adds per candidate as the default 8 experts of (256, 128). ``watch_scale`` (seconds) is set by
    the trainer to the mean watch time of the training data; the Poisson head predicts
    ``watch / watch_scale`` so its logit starts near 0. ``gate_dropout`` defaults to 0.1, the
    expert dropout YouTube used against gate polarisation; ``gate_temperature`` > 1 flattens the
    gates (Merlin exposes the same knob).
    """

    arch: str = "mmoe"
    embedding_dim: int = 16
    n_experts: int = 8
    expert_hidden: tuple[int, ...] = (256, 128)
    tower_hidden: tuple[int, ...] = (64,)
    tasks: tuple[str, ...] = TASKS
    gate_temperature: float = 1.0
    gate_dropout: float = 0.1
    watch_scale: float = 1.0
    bottom_hidden: tuple[int, ...] = (768, 512)
    interactions: tuple[str, ...] = DEFAULT_INTERACTIONS
    interaction_dim: int = 32
    shared_experts: int = 2  # PLE and STEM: experts on the shared input
    task_experts: int = 2  # PLE and STEM: experts of each task's own
    entire_space: bool = False  # heads chained with the click (ESMM; layers.Heads)
    ple_levels: int = 1  # PLE: extraction levels (1 = CGC; 2 splits the expert layers)

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if min(self.embedding_dim, self.n_experts, self.shared_experts, self.task_experts) < 1:
            raise ValueError("embedding_dim and the expert counts must be >= 1")
        positive_dims("expert_hidden", self.expert_hidden)
        positive_dims("bottom_hidden", self.bottom_hidden)
        if self.tower_hidden and min(self.tower_hidden) < 1:
            raise ValueError(f"tower_hidden must hold positive ints, got {self.tower_hidden!r}")
        known = BINARY_TASKS | POISSON_TASKS
        if not self.tasks or len(set(self.tasks)) != len(self.tasks) or set(self.tasks) - known:
            raise ValueError(f"tasks must be distinct names from {sorted(known)}")
        if not (self.gate_temperature > 0 and math.isfinite(self.gate_temperature)):
            raise ValueError("gate_temperature must be a finite number > 0")
        if not 0.0 <= self.gate_dropout < 1.0:
            raise ValueError("gate_dropout must be in [0, 1)")
        if not (self.watch_scale > 0 and math.isfinite(self.watch_scale)):
            raise ValueError("watch_scale must be a finite number of seconds > 0")
        if len(set(self.interactions)) != len(self.interactions) or (
            set(self.interactions) - set(INTERACTIONS)
        ):
            raise ValueError(f"interactions must be distinct names from {INTERACTIONS}")
        if self.interaction_dim < 1:
            raise ValueError("interaction_dim must be >= 1")
        if self.ple_levels not in (1, 2):
            raise ValueError(f"ple_levels must be 1 or 2, got {self.ple_levels}")
        if self.ple_levels == 2 and (self.arch != "ple" or len(self.expert_hidden) < 2):
            raise ValueError("two extraction levels need arch 'ple' and >= 2 expert layers")
        if self.entire_space and (self.arch == "single_task" or CLICK not in self.tasks):
            # single-task models share nothing, and every chained head needs the click's
            raise ValueError("entire_space needs a multi-task arch whose tasks include click")

    @classmethod
    def small(cls, **overrides: Any) -> MMoEConfig:
        """A tiny configuration for tests: 8-dim embeddings, 4 experts of (32, 16), towers (16,)."""
        base = cls(
            embedding_dim=8,
            n_experts=4,
            expert_hidden=(32, 16),
            tower_hidden=(16,),
            bottom_hidden=(64, 32),
            shared_experts=1,
            task_experts=1,
        )
        return replace(base, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MMoEConfig:
        """Rebuild from ``to_dict()`` output; unknown keys are an error."""
        names = {f.name for f in fields(cls)}
        if unknown := sorted(set(d) - names):
            raise ValueError(f"unknown MMoEConfig keys: {unknown}")
        kwargs: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**kwargs)


# -- models ------------------------------------------------------------------------------------


def expert_layout(cfg: MMoEConfig) -> tuple[int, int, list[list[int]]]:
    """(experts, gates, per task the experts its gate mixes) of a mixture architecture.

    MMoE: a gate per task over all ``n_experts``; OMoE: one gate shared by all tasks; PLE/CGC:
    ``shared_experts`` + ``task_experts`` per task, task t's gate over the shared ones and its
    own (shared first); STEM: the same experts, every gate over all of them.
    """
    n_tasks, n = len(cfg.tasks), cfg.n_experts
    if cfg.arch == "stem":
        total = cfg.shared_experts + n_tasks * cfg.task_experts
        return total, n_tasks, [list(range(total))] * n_tasks
    if cfg.arch == "ple":
        s, k = cfg.shared_experts, cfg.task_experts
        index = [[*range(s), *range(s + t * k, s + (t + 1) * k)] for t in range(n_tasks)]
        return s + n_tasks * k, n_tasks, index
    return n, (1 if cfg.arch == "omoe" else n_tasks), [list(range(n))] * n_tasks


class RankingModel(nn.Module):
    """What every architecture shares: field embeddings plus explicit interactions as input,
    per-task logits (plus the interactions' task terms) into ``Heads``.
    """

    config: MMoEConfig
    heads: Heads

    def _build_input(self, config: MMoEConfig, schema: FeatureSchema) -> tuple[int, int]:
        """Build ``embedding`` and ``interactions``; returns the (user, item) input widths."""
        self.embedding = FeatureEmbedding(schema, config.embedding_dim)
        self.interactions: Interactions | None = None
        if config.interactions:
            kinds = set(config.interactions)
            self.interactions = Interactions(
                schema,
                len(config.tasks),
                config.interaction_dim,
                dots="dots" in kinds,
                bilinear="bilinear" in kinds,
                first_order="first_order" in kinds,
            )
        extra = self.interactions.out_dim if self.interactions is not None else 0
        return self.embedding.user_dim, self.embedding.item_dim + extra

    def shared_input(self, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor | None]:
        """-> (u B_u x D_u, item side v N x D_i' with the dots appended, logit terms N x T)."""
        u, v = self.embedding(inputs)
        if self.interactions is None:
            return u, v, None
        dots, terms = self.interactions(inputs)
        if dots is not None:
            v = torch.cat([v, dots], 1)
        return u, v, terms

    def task_logits(self, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        """-> (logits T x N before calibration, gates N x T x E or None)."""
        raise NotImplementedError

    def set_output_bias(self, values: Tensor) -> None:
        """Set each task's output bias (T values), e.g. to the training base rates."""
        raise NotImplementedError

    def forward(self, inputs: dict[str, Tensor], return_gates: bool = False) -> dict[str, Tensor]:
        """Encoded inputs -> {task: N, task_logit: N[, "gates": N x T x E where gates exist]}."""
        logits, gates = self.task_logits(inputs)
        out: dict[str, Tensor] = self.heads(logits)
        if return_gates and gates is not None:
            out["gates"] = gates
        return out


def add_task_terms(logits: Tensor, terms: Tensor | None) -> Tensor:
    """Tower logits T x N plus the interaction layer's per-task terms N x T, if any."""
    return logits if terms is None else logits + terms.T


class _Mixture(RankingModel):
    """Embedding + interactions -> Experts + Gates -> per-task mixtures -> Towers -> Heads.

    The experts, gates and expert sets per task follow ``expert_layout(config)``; all experts
    run as one batched module, and a task's mixture is ``sum_k gate[t, k] * expert[index[t, k]]``.
    """

    expert_index: Tensor

    def __init__(self, config: MMoEConfig, schema: FeatureSchema) -> None:
        super().__init__()
        self.config = config
        d_u, d_i = self._build_input(config, schema)
        n_experts, self.n_gates, index = expert_layout(config)
        self.n_tasks = len(config.tasks)
        self.selective = len(index[0]) < n_experts  # PLE: a task mixes a subset
        self.register_buffer("expert_index", torch.tensor(index))  # T x K
        self.experts = Experts(d_u, d_i, n_experts, config.expert_hidden)
        self.gates = Gates(
            d_u,
            d_i,
            self.n_gates,
            len(index[0]),
            config.gate_temperature,
            config.gate_dropout,
        )
        self.towers = Towers(self.experts.out_dim, config.tower_hidden, self.n_tasks)
        self.heads = Heads(config.tasks, config.watch_scale, config.entire_space)

    def task_logits(self, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        u, v, terms = self.shared_input(inputs)
        experts = self.experts(u, v)  # E x N x H
        gates = self.gates(u, v)  # N x G x K
        if self.n_gates != self.n_tasks:  # OMoE: the one gate serves every task
            gates = gates.expand(-1, self.n_tasks, -1)
        chosen = experts[self.expert_index] if self.selective else experts.unsqueeze(0)
        mixed = mix(gates, chosen)  # T x N x H
        return add_task_terms(self.towers(mixed), terms), gates

    def set_output_bias(self, values: Tensor) -> None:
        self.towers.set_output_bias(values)


class MMoE(_Mixture):
    """Multi-gate MoE (Ma et al., KDD 2018): every task's own gate over all experts."""


class OMoE(_Mixture):
    """One-gate MoE: the MMoE paper's baseline, one gate shared by all tasks."""


class PLE(_Mixture):
    """PLE with one extraction level, i.e. CGC (Tang et al., RecSys 2020): shared experts plus
    ``task_experts`` per task; each task's gate mixes its own experts and the shared ones.
    """


class ProgressiveLayeredExtraction(RankingModel):
    """PLE with two extraction levels (Tang et al., RecSys 2020, section 4.3).

    Level 1 is CGC on the input with the experts' first layer (H1), plus a shared gate over all
    of its experts; level 2's experts (the remaining expert layers) read level 1's outputs -
    task t's experts its mixture, the shared experts the shared mixture - and task t's gate at
    level 2 reads task t's level-1 output. The experts' layers are split between the levels,
    so the cost per candidate stays CGC's plus the shared gate and the level-2 gates; the user
    side of level 1 is still computed once per request.
    """

    expert_index: Tensor
    expert_group: Tensor

    def __init__(self, config: MMoEConfig, schema: FeatureSchema) -> None:
        super().__init__()
        self.config = config
        d_u, d_i = self._build_input(config, schema)
        n_experts, _, index = expert_layout(config)
        self.n_tasks = n_tasks = len(config.tasks)
        s, k = config.shared_experts, config.task_experts
        h1, *rest = config.expert_hidden
        temperature, dropout = config.gate_temperature, config.gate_dropout
        self.register_buffer("expert_index", torch.tensor(index))  # T x (S + K)
        # Level 2: which level-1 output each expert reads (0: the shared mixture, 1 + t: task t).
        group = [0] * s + [1 + t for t in range(n_tasks) for _ in range(k)]
        self.register_buffer("expert_group", torch.tensor(group))
        self.experts = Experts(d_u, d_i, n_experts, (h1,))
        self.gates = Gates(d_u, d_i, n_tasks, s + k, temperature, dropout)
        self.shared_gate = Gates(d_u, d_i, 1, n_experts, temperature, dropout)
        self.upper = nn.ModuleList(BatchedLinear(n_experts, a, b) for a, b in pairwise((h1, *rest)))
        self.upper_gates = BatchedLinear(n_tasks, h1, s + k)  # task t's gate on its output
        self.temperature, self.dropout = temperature, dropout
        self.towers = Towers(config.expert_hidden[-1], config.tower_hidden, n_tasks)
        self.heads = Heads(config.tasks, config.watch_scale, config.entire_space)

    def task_logits(self, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        u, v, terms = self.shared_input(inputs)
        first = self.experts(u, v)  # E x N x H1
        own = mix(self.gates(u, v), first[self.expert_index])  # T x N x H1
        shared = mix(self.shared_gate(u, v), first.unsqueeze(0))  # 1 x N x H1
        h = torch.cat([shared, own])[self.expert_group]  # E x N x H1
        for layer in self.upper:
            h = F.relu(layer(h))  # E x N x H_last
        logits = self.upper_gates(own) / self.temperature  # T x N x (S + K)
        gates = gate_softmax(logits, self.dropout if self.training else 0.0).transpose(0, 1)
        mixed = mix(gates, h[self.expert_index])  # T x N x H_last
        return add_task_terms(self.towers(mixed), terms), gates

    def set_output_bias(self, values: Tensor) -> None:
        self.towers.set_output_bias(values)


def mix(gates: Tensor, chosen: Tensor) -> Tensor:
    """``sum_k gate[n, t, k] * chosen[t, k, n]``: gates N x T x K, chosen (T|1) x K x N x H ->
    T x N x H.

    Exported (a request) as a broadcast multiply-add; in torch as N small ``[T, K] x [K, H]``
    products (one ``bmm`` per distinct ``chosen``), which in training is ~2x faster forward and
    backward than the broadcast's T x K x N x H temporary. Same sums.
    """
    if torch.jit.is_tracing():
        return (gates.permute(1, 2, 0).unsqueeze(-1) * chosen).sum(1)
    if chosen.shape[0] == 1:  # every task mixes the same experts
        return torch.bmm(gates, chosen[0].transpose(0, 1)).transpose(0, 1)
    rows = [torch.bmm(gates[:, t : t + 1], c.transpose(0, 1)) for t, c in enumerate(chosen)]
    return torch.cat(rows, 1).transpose(0, 1)


class STEM(RankingModel):
    """MMoE with shared and task-specific embeddings (STEM-Net, Su et al., AAAI 2024).

    Embedding sets: the shared ``embedding`` plus ``task_embeddings[t]`` per task, each a
    ``FeatureEmbedding`` of the same width; the interaction layer stays shared (its bilinear and
    first-order terms are per task already) and its dots join every set's item side. Experts:
    ``shared_experts`` on the shared set, ``task_experts`` on each task's set (one ``Experts``
    module per set). Task t's gate reads task t's set and mixes all S + T*K experts.

    In training, a task's mixture sees the other tasks' experts through a stop-gradient: the
    forward pass is the same as at serving, but task t's loss updates only the shared experts
    and embeddings and its own ("all forward, task-specific backward"), so a task that conflicts
    with t cannot pull t's own embeddings. Every expert reads one set of the same width, so the
    cost per candidate is MMoE's with S + T*K experts, plus T more embedding lookups per field.
    """

    own_mask: Tensor

    def __init__(self, config: MMoEConfig, schema: FeatureSchema) -> None:
        super().__init__()
        self.config = config
        d_u, d_i = self._build_input(config, schema)
        self.n_tasks = n_tasks = len(config.tasks)
        s, k = config.shared_experts, config.task_experts
        self.task_embeddings = nn.ModuleList(
            FeatureEmbedding(schema, config.embedding_dim) for _ in config.tasks
        )
        self.experts = nn.ModuleList(
            Experts(d_u, d_i, n, config.expert_hidden) for n in (s, *[k] * n_tasks)
        )
        total = s + n_tasks * k
        self.gates = nn.ModuleList(
            Gates(d_u, d_i, 1, total, config.gate_temperature, config.gate_dropout)
            for _ in config.tasks
        )
        own = torch.zeros(n_tasks, total, dtype=torch.bool)
        own[:, :s] = True
        for t in range(n_tasks):
            own[t, s + t * k : s + (t + 1) * k] = True
        self.register_buffer("own_mask", own[:, :, None, None])  # T x E x 1 x 1
        self.towers = Towers(config.expert_hidden[-1], config.tower_hidden, n_tasks)
        self.heads = Heads(config.tasks, config.watch_scale, config.entire_space)

    def _sets(self, inputs: dict[str, Tensor]) -> tuple[list[tuple[Tensor, Tensor]], Tensor | None]:
        """([(u, v)] for the shared set and each task's, dots appended; the task logit terms)."""
        dots, terms = (None, None) if self.interactions is None else self.interactions(inputs)
        sets = [emb(inputs) for emb in (self.embedding, *self.task_embeddings)]
        if dots is not None:
            sets = [(u, torch.cat([v, dots], 1)) for u, v in sets]
        return sets, terms

    def task_logits(self, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        sets, terms = self._sets(inputs)
        experts = torch.cat([ex(u, v) for ex, (u, v) in zip(self.experts, sets, strict=True)])
        gates = torch.cat(
            [gate(u, v) for gate, (u, v) in zip(self.gates, sets[1:], strict=True)], 1
        )  # N x T x E
        chosen = experts.unsqueeze(0)  # 1 x E x N x H: the same forward in training and serving
        if self.training:  # T x E x N x H: other tasks' experts without their gradient
            chosen = torch.where(self.own_mask, chosen, chosen.detach())
        mixed = mix(gates, chosen)  # T x N x H
        return add_task_terms(self.towers(mixed), terms), gates

    def set_output_bias(self, values: Tensor) -> None:
        self.towers.set_output_bias(values)


class SharedBottom(RankingModel):
    """One shared ReLU MLP (first layer split like the experts') -> Towers -> Heads; no gates."""

    def __init__(self, config: MMoEConfig, schema: FeatureSchema) -> None:
        super().__init__()
        self.config = config
        d_u, d_i = self._build_input(config, schema)
        hidden = config.bottom_hidden
        self.first = SplitLinear(d_u, d_i, hidden[0])
        self.rest = nn.ModuleList(nn.Linear(a, b) for a, b in pairwise(hidden))
        self.n_tasks = len(config.tasks)
        self.towers = Towers(hidden[-1], config.tower_hidden, self.n_tasks)
        self.heads = Heads(config.tasks, config.watch_scale, config.entire_space)

    def task_logits(self, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        u, v, terms = self.shared_input(inputs)
        h = F.relu(self.first(u, v))  # N x B1
        for layer in self.rest:
            h = F.relu(layer(h))
        shared = h.unsqueeze(0).expand(self.n_tasks, -1, -1)  # T x N x B_last
        return add_task_terms(self.towers(shared), terms), None

    def set_output_bias(self, values: Tensor) -> None:
        self.towers.set_output_bias(values)


class SingleTask(RankingModel):
    """One independent model per task, trained in the same loop on the summed task losses.

    Each task gets a shared-bottom network of its own (``tasks=(task,)``): its own embeddings,
    interaction layer, bottom and tower, so no parameter -- and no gradient -- is shared between
    tasks. Only the calibrated ``Heads`` sit on top of all of them. Costs T times a one-task
    shared bottom per candidate.
    """

    def __init__(self, config: MMoEConfig, schema: FeatureSchema) -> None:
        super().__init__()
        self.config = config
        self.models = nn.ModuleList(
            SharedBottom(replace(config, arch="shared_bottom", tasks=(t,)), schema)
            for t in config.tasks
        )
        self.heads = Heads(config.tasks, config.watch_scale, config.entire_space)

    def task_logits(self, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        logits = [model.task_logits(inputs)[0] for model in self._models()]  # 1 x N each
        return torch.cat(logits, 0), None

    def set_output_bias(self, values: Tensor) -> None:
        for model, value in zip(self._models(), values, strict=True):
            model.set_output_bias(value.reshape(1))

    def _models(self) -> list[SharedBottom]:
        return [m for m in self.models if isinstance(m, SharedBottom)]

    def task_models(self) -> dict[str, SharedBottom]:
        """Each task's own network."""
        return dict(zip(self.config.tasks, self._models(), strict=True))


_BUILDERS: dict[str, type[RankingModel]] = {
    "single_task": SingleTask,
    "shared_bottom": SharedBottom,
    "omoe": OMoE,
    "mmoe": MMoE,
    "ple": PLE,
    "stem": STEM,
}


def init_output_bias(model: RankingModel, base_rates: dict[str, float]) -> None:
    """Start each head at its base rate: logit(p) for probabilities, log(mean/scale) for watch.

    Without this the heads start at p = 0.5 and the first steps are spent learning the prior
    (likes are ~2% of impressions).
    """
    values = []
    chained = model.config.entire_space
    for task in model.config.tasks:
        rate = base_rates[task]
        if chained and task != CLICK:  # the tower predicts given a click: its rate per click
            rate /= max(base_rates[CLICK], 1e-6)
        if task in POISSON_TASKS:
            values.append(math.log(max(rate, 1e-6) / model.config.watch_scale))
        else:
            p = min(max(rate, 1e-6), 1 - 1e-6)
            values.append(math.log(p / (1 - p)))
    model.set_output_bias(torch.tensor(values))


def build_model(config: MMoEConfig, schema: FeatureSchema) -> RankingModel:
    """The model ``config.arch`` names (``ple`` with ``ple_levels`` 2: two extraction levels)."""
    if config.arch == "ple" and config.ple_levels == 2:
        return ProgressiveLayeredExtraction(config, schema)
    return _BUILDERS[config.arch](config, schema)


# -- cost --------------------------------------------------------------------------------------


def _mlp_macs(dims: tuple[int, ...]) -> int:
    return sum(a * b for a, b in pairwise(dims))


def _interaction_macs(
    cfg: MMoEConfig, layouts: dict[str, EntityLayout], user_side_once: bool
) -> tuple[int, int]:
    """(multiply-adds of the interaction layer, number of dots it adds to the item side)."""
    kinds = set(cfg.interactions)
    f_u = sum(n_fields(layouts[e]) for e in ("user", "context"))
    f_i, dim, n_tasks = n_fields(layouts["item"]), cfg.interaction_dim, len(cfg.tasks)
    macs, dots = 0, 0
    if "dots" in kinds:
        macs, dots = f_u * f_i * dim, f_u * f_i
    if "bilinear" in kinds:
        macs += n_tasks * f_i * dim + (0 if user_side_once else n_tasks * f_u * f_i * dim)
    return macs, dots  # first-order terms are lookups and adds only


def flops_per_candidate(
    cfg: MMoEConfig, schema: FeatureSchema, *, user_side_once: bool = False
) -> int:
    """Dense FLOPs (2 per multiply-add) to score one candidate.

    With d = D_u + D_i the embedded input width (D_i including the F_u * F_i interaction dots),
    E experts of widths (H1..HL), G gates of K experts each, T tasks and towers (t1..tm):

        MoE   = 2 * [ d*E*H1 + E*sum_j H_j*H_{j+1} + d*G*K + T*K*HL + T*MLP(HL, t1..tm, 1) + I ]
        SB    = 2 * [ d*B1 + sum_j B_j*B_{j+1} + T*MLP(BL, t1..tm, 1) + I ]
        single_task = T * SB of one task

    (first layers, deeper expert layers, gates, gate mixture, towers, interactions). MMoE has
    G = T gates over K = E experts, OMoE G = 1, PLE E = S + T*K_t experts and G = T gates over
    K = S + K_t (two extraction levels add a shared gate over all E at level 1, T gates of K on
    H1 at level 2 and the level-1 mixtures); STEM E = S + T*K_t experts (each reading one
    embedding set of width d) and G = T gates over all E. With interaction width k, the
    interactions I are F_u*F_i*k for the dots and T*F_i*k for the bilinear terms, plus
    T*F_u*F_i*k for the bilinear user side. Embedding
    lookups, biases and activations are left out. ``user_side_once`` drops the D_u rows of the
    first layers and gates and the bilinear user side: the per-candidate cost when a request's
    user side is computed once and N is large.
    """
    if cfg.arch == "single_task":
        one = replace(cfg, arch="shared_bottom", tasks=cfg.tasks[:1])
        return len(cfg.tasks) * flops_per_candidate(one, schema, user_side_once=user_side_once)
    layouts = {e: schema.layout(e) for e in ENTITIES}
    d_u = sum(entity_width(layouts[e], cfg.embedding_dim) for e in ("user", "context"))
    inter, dots = _interaction_macs(cfg, layouts, user_side_once)
    d_i = entity_width(layouts["item"], cfg.embedding_dim) + dots
    d = d_i if user_side_once else d_u + d_i
    n_tasks = len(cfg.tasks)
    if cfg.arch == "shared_bottom":
        b = cfg.bottom_hidden
        macs = d * b[0] + _mlp_macs(b)
        tower_in = b[-1]
    else:
        e, gates, index = expert_layout(cfg)
        h, k = cfg.expert_hidden, len(index[0])
        macs = d * e * h[0] + e * _mlp_macs(h) + d * gates * k + n_tasks * k * h[-1]
        if cfg.ple_levels == 2:  # the shared gate and mixture; level 2's gates and mixtures
            macs += d * e + e * h[0] + n_tasks * k * h[0] + n_tasks * h[0] * k
        tower_in = h[-1]
    macs += n_tasks * _mlp_macs((tower_in, *cfg.tower_hidden, 1)) + inter
    return 2 * macs
