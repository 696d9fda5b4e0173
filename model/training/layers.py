"""The building blocks every ranking architecture is made of (torch).

``FeatureEmbedding`` (schema inputs -> user side u, item side v), ``Interactions`` (explicit
user x item field interactions), ``SplitLinear`` (a first layer split by input side, so a
request's user side is computed once), ``BatchedLinear`` (G independent layers as one batched
matmul), ``Experts``, ``Gates``, ``Towers`` and ``Heads``. model/training/mmoe.py assembles them
into the architectures; its docstring explains the layout.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from itertools import pairwise

import torch
from torch import Tensor, nn
from torch.nn import functional as F  # noqa: N812 -- the conventional alias

from model.core.features import ENTITIES, EntityLayout, FeatureSchema
from model.core.tasks import PROBABILITY_TASKS, TASKS

BINARY_TASKS: frozenset[str] = PROBABILITY_TASKS  # trained with BCE on a logit
POISSON_TASKS: frozenset[str] = frozenset(TASKS) - PROBABILITY_TASKS  # Poisson NLL, log rate
# Clamp of the watch-time log-rate (relative to watch_scale): exp(10) ~ 2.2e4 times the mean
# keeps float32 finite and the gradient alive over any plausible range.
WATCH_LOG_RATE_MIN = -15.0
WATCH_LOG_RATE_MAX = 10.0
CLICK = "click"  # the task every other one follows (entire-space heads)


def positive_dims(name: str, dims: tuple[int, ...]) -> None:
    """Raise ValueError unless ``dims`` is a non-empty tuple of positive ints."""
    if not dims or any(not isinstance(d, int) or d < 1 for d in dims):
        raise ValueError(f"{name} must be a non-empty tuple of positive ints, got {dims!r}")


def entity_width(layout: EntityLayout, dim: int) -> int:
    return (len(layout.cat) + len(layout.multi)) * dim + len(layout.num)


def _embedding(rows: int, dim: int) -> nn.Embedding:
    # N(0, 0.05) rather than the default N(0, 1), which would swamp the standardised numerics.
    weight = nn.init.normal_(torch.empty(rows, dim), std=0.05)
    return nn.Embedding.from_pretrained(weight, freeze=False)


def _field_vectors(table: nn.Module, lay: EntityLayout, inputs: dict[str, Tensor]) -> Tensor | None:
    """B x F x D: one row of ``table`` per categorical field, one pooled row per multi field."""
    e = lay.entity
    if lay.cat and lay.multi and not torch.jit.is_tracing():
        # One lookup for both: a table's backward zero-fills a gradient of the whole table per
        # lookup (22 MB for the item side's interaction table), so two would cost it twice.
        cat, multi = inputs[f"{e}_cat"], inputs[f"{e}_multi"]  # B x C, B x M x L
        rows = table(torch.cat([cat, multi.flatten(1)], 1))  # B x (C + M*L) x D
        emb = rows[:, cat.shape[1] :].unflatten(1, multi.shape[1:])  # B x M x L x D
        pooled = (emb * inputs[f"{e}_multi_w"].unsqueeze(-1)).sum(2)  # B x M x D
        return torch.cat([rows[:, : cat.shape[1]], pooled], 1)
    parts: list[Tensor] = []
    if lay.cat:
        parts.append(table(inputs[f"{e}_cat"]))  # B x C x D
    if lay.multi:
        emb = table(inputs[f"{e}_multi"])  # B x M x L x D
        parts.append((emb * inputs[f"{e}_multi_w"].unsqueeze(-1)).sum(2))  # B x M x D
    return torch.cat(parts, 1) if parts else None


def looked_up_l2(model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    """Mean over the batch's rows of the squared norms of every id-table row they look up.

    Every ``FeatureEmbedding`` and ``Interactions`` table of ``model`` (the shared embeddings,
    STEM's task sets, the interaction tables and their first-order weights): an id's rows are
    pulled towards 0 in proportion to how often it is seen, the matrix-factorisation form of L2
    (a multi-valued field's pooled row counts as one).
    """
    total = torch.zeros(())
    for module in model.modules():
        if isinstance(module, FeatureEmbedding | Interactions):
            for tables in module.id_tables():
                for entity, table in tables.items():
                    rows = _field_vectors(table, module.layouts[entity], inputs)
                    if rows is not None:
                        total = total + rows.float().pow(2).sum((1, 2)).mean()
    return total


class FeatureEmbedding(nn.Module):
    """Encoded schema inputs -> (user-side u [B_u x D_u], item-side v [N x D_i]).

    One ``nn.Embedding`` per entity over the entity's global index space
    (``schema.layout(entity).table_size`` rows). Categorical embeddings are flattened,
    multi-categorical ones pooled with the encoder's weights (mean over present slots), numerics
    appended. u concatenates the user and context entities.
    """

    def __init__(self, schema: FeatureSchema, dim: int) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"embedding dim must be >= 1, got {dim}")
        self.dim = dim
        self.layouts = {e: schema.layout(e) for e in ENTITIES}
        self.tables = nn.ModuleDict(
            {
                e: _embedding(lay.table_size, dim)
                for e, lay in self.layouts.items()
                if lay.table_size
            }
        )
        self.user_dim = sum(entity_width(self.layouts[e], dim) for e in ("user", "context"))
        self.item_dim = entity_width(self.layouts["item"], dim)
        if self.user_dim < 1 or self.item_dim < 1:
            raise ValueError("the schema needs at least one user/context and one item feature")

    def id_tables(self) -> list[nn.ModuleDict]:
        """The id tables (one per entity)."""
        return [self.tables]

    def input_names(self, entity: str) -> list[str]:
        """Names of the encoded inputs this entity needs (as in ``schema.input_specs()``)."""
        lay = self.layouts[entity]
        names = [f"{entity}_cat"] if lay.cat else []
        names += [f"{entity}_multi", f"{entity}_multi_w"] if lay.multi else []
        return names + ([f"{entity}_num"] if lay.num else [])

    def _entity_vector(self, entity: str, inputs: dict[str, Tensor]) -> Tensor | None:
        """B x W_e: flattened categorical embeddings, pooled multi-hot embeddings, numerics."""
        lay = self.layouts[entity]
        parts: list[Tensor] = []
        if lay.table_size:
            fields = _field_vectors(self.tables[entity], lay, inputs)
            assert fields is not None  # a non-empty table means categorical fields
            parts.append(fields.flatten(1))
        if lay.num:
            parts.append(inputs[f"{entity}_num"])
        return torch.cat(parts, 1) if parts else None

    def forward(self, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """inputs -> (u: B_u x D_u, v: N x D_i); B_u is 1 (serving) or N (training)."""
        if not torch.jit.is_tracing():
            self._check(inputs)
        user = [x for e in ("user", "context") if (x := self._entity_vector(e, inputs)) is not None]
        item = self._entity_vector("item", inputs)
        assert item is not None  # the constructor guarantees item features
        return torch.cat(user, 1), item

    def _check(self, inputs: dict[str, Tensor]) -> None:
        missing = [n for e in ENTITIES for n in self.input_names(e) if n not in inputs]
        if missing:
            raise ValueError(f"missing encoded inputs: {missing}")
        n = inputs[self.input_names("item")[0]].shape[0]
        for e in ("user", "context"):
            for name in self.input_names(e):
                if inputs[name].shape[0] not in (1, n):
                    raise ValueError(f"{name} has batch {inputs[name].shape[0]}; need 1 or {n}")


def n_fields(lay: EntityLayout) -> int:
    return len(lay.cat) + len(lay.multi)


class Interactions(nn.Module):
    """Explicit user-side x item-side interactions between field embeddings.

    Every categorical and multi-categorical field gets a vector from the interaction tables
    (``dim`` wide, separate from the MLP's embeddings). With user/context field vectors
    ``a_f`` (F_u of them) and item field vectors ``b_g`` (F_i):

    ``dots`` (DLRM, Naumov et al. 2019)
        the F_u * F_i scalars ``<a_f, b_g>``, appended to the item-side input of the experts,
        gates and shared bottom.
    ``bilinear`` (per-task field-weighted factorisation machine)
        a logit term per task, ``sum_{f,g} <r_tfg * a_f, b_g>`` with a learnt vector ``r_tfg``
        per task and field pair: one set of embeddings, a different weighting of its
        dimensions per task (a diagonal bilinear form).
    ``first_order``
        a logit term per task, the sum over fields of a learnt scalar per id (the "wide" part).

    A dot product is an MLP's weak spot (Rendle et al., RecSys 2020); these give it exactly.
    """

    def __init__(
        self,
        schema: FeatureSchema,
        n_tasks: int,
        dim: int,
        *,
        dots: bool,
        bilinear: bool,
        first_order: bool,
    ) -> None:
        super().__init__()
        self.layouts = {e: schema.layout(e) for e in ENTITIES}
        self.user_entities = tuple(e for e in ("user", "context") if self.layouts[e].table_size)
        self.n_user = sum(n_fields(self.layouts[e]) for e in self.user_entities)
        self.n_item = n_fields(self.layouts["item"])
        if dim < 1 or not (self.n_user and self.n_item):
            raise ValueError("interactions need dim >= 1 and user-side and item-side fields")
        self.dim, self.n_tasks = dim, n_tasks
        self.dots, self.bilinear, self.first_order = dots, bilinear, first_order
        used = ("user", "context", "item")
        self.tables = nn.ModuleDict(
            {
                e: _embedding(self.layouts[e].table_size, dim)
                for e in used
                if self.layouts[e].table_size
            }
        )
        if first_order:
            self.wide = nn.ModuleDict(
                {
                    e: nn.Embedding.from_pretrained(
                        torch.zeros(self.layouts[e].table_size, n_tasks), freeze=False
                    )
                    for e in used
                    if self.layouts[e].table_size
                }
            )
        if bilinear:
            self.pair_weights = nn.Parameter(torch.ones(n_tasks, self.n_user, self.n_item, dim))
        self.out_dim = self.n_user * self.n_item if dots else 0

    def id_tables(self) -> list[nn.ModuleDict]:
        """The interaction tables, and the first-order weights where there are."""
        return [self.tables, self.wide] if self.first_order else [self.tables]

    def sides(self, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(user-side field vectors B_u x F_u x D, item-side field vectors N x F_i x D)."""
        user = [_field_vectors(self.tables[e], self.layouts[e], inputs) for e in self.user_entities]
        item = _field_vectors(self.tables["item"], self.layouts["item"], inputs)
        assert item is not None
        return torch.cat([u for u in user if u is not None], 1), item

    def wide_logits(self, inputs: dict[str, Tensor]) -> Tensor:
        """First-order terms N x T (user side B_u x T broadcast over the N items)."""
        total: Tensor | None = None
        for e, table in self.wide.items():
            w = _field_vectors(table, self.layouts[e], inputs)
            if w is not None:
                total = w.sum(1) if total is None else total + w.sum(1)
        assert total is not None  # the constructor guarantees item fields
        return total

    def forward(self, inputs: dict[str, Tensor]) -> tuple[Tensor | None, Tensor | None]:
        """-> (dots N x F_i*F_u or None, task logit terms N x T or None).

        With a user side of batch 1 (a request) the user vectors are one matrix shared by all N
        candidates: the dots are one ``[N*F_i, k] x [k, F_u]`` GEMM and the bilinear terms one
        ``[N, F_i*k] x [F_i*k, T]`` GEMM against ``q``, computed once per request. A traced
        request-shaped export keeps exactly this path. Training rows (B_u = N) use
        ``_row_terms``.
        """
        if not (self.dots or self.bilinear or self.first_order):
            return None, None
        a, b = self.sides(inputs)  # B_u x F_u x k, N x F_i x k
        dots, logits = None, None
        if a.shape[0] != 1:
            dots, logits = self._row_terms(a, b)
        else:
            if self.dots:  # dots[n, g, f] = <b_ng, a_f>, flattened item field major
                dots = (b.reshape(-1, self.dim) @ a[0].T).reshape(b.shape[0], -1)
            if self.bilinear:
                # q_tg = sum_f r_tfg * a_f depends on the user side only.
                q = torch.einsum("bfd,tfgd->btgd", a, self.pair_weights).flatten(2)  # 1 x T x F_i*k
                logits = b.flatten(1) @ q[0].T  # N x T
        if self.first_order:
            wide = self.wide_logits(inputs)
            logits = wide if logits is None else logits + wide
        return dots, logits

    def _row_terms(self, a: Tensor, b: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """Dots and bilinear terms of training rows (a: N x F_u x k, b: N x F_i x k).

        Both come from one outer product ``a_nf * b_ng`` (N x F_u x F_i x k): the dots are its
        sums over k, the bilinear terms one [N, F_u*F_i*k] x [F_u*F_i*k, T] GEMM against the
        pair weights. The per-row batched matmuls this replaces (N products of a few fields)
        measured ~3x slower forward and backward on CPU; the values are the same sums.
        """
        outer = a.unsqueeze(2) * b.unsqueeze(1)  # N x F_u x F_i x k
        dots = outer.sum(-1).transpose(1, 2).flatten(1) if self.dots else None  # N x F_i*F_u
        logits = outer.flatten(1) @ self.pair_weights.flatten(1).T if self.bilinear else None
        return dots, logits


def _uniform_(t: Tensor, fan_in: int) -> Tensor:
    """nn.Linear's default initialisation range, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return nn.init.uniform_(t, -bound, bound)


class SplitLinear(nn.Module):
    """``x @ W + b`` for ``x = [u, v]`` computed as ``u @ W_u + v @ W_v + b``.

    With u of batch 1 the user term is one row that broadcasts over the N item rows, so the
    user-side work is done once per request. Equal to ``nn.Linear(D_u + D_i, out)`` with weight
    ``[W_u; W_v]^T``.
    """

    def __init__(self, user_dim: int, item_dim: int, out_dim: int) -> None:
        super().__init__()
        if user_dim < 1 or item_dim < 1 or out_dim < 1:
            raise ValueError(f"SplitLinear dims must be >= 1, got {(user_dim, item_dim, out_dim)}")
        fan_in = user_dim + item_dim
        self.w_user = nn.Parameter(_uniform_(torch.empty(user_dim, out_dim), fan_in))
        self.w_item = nn.Parameter(_uniform_(torch.empty(item_dim, out_dim), fan_in))
        self.bias = nn.Parameter(_uniform_(torch.empty(out_dim), fan_in))

    def forward(self, u: Tensor, v: Tensor) -> Tensor:
        """u: B_u x D_u, v: N x D_i -> N x out (B_u = 1 broadcasts)."""
        return (u @ self.w_user + self.bias) + v @ self.w_item


class BatchedLinear(nn.Module):
    """G independent linear layers as one batched matmul: G x B x I -> G x B x O."""

    def __init__(self, groups: int, in_dim: int, out_dim: int) -> None:
        super().__init__()
        if groups < 1 or in_dim < 1 or out_dim < 1:
            raise ValueError(f"BatchedLinear dims must be >= 1, got {(groups, in_dim, out_dim)}")
        self.weight = nn.Parameter(_uniform_(torch.empty(groups, in_dim, out_dim), in_dim))
        self.bias = nn.Parameter(_uniform_(torch.empty(groups, 1, out_dim), in_dim))

    def forward(self, x: Tensor) -> Tensor:
        """x: G x B x I -> G x B x O ("gbi,gio->gbo")."""
        if torch.jit.is_tracing():  # the exported graph: MatMul + Add
            return torch.matmul(x, self.weight) + self.bias
        return torch.baddbmm(self.bias, x, self.weight)  # one kernel, no separate add


def batched(layers: nn.ModuleList) -> Iterator[BatchedLinear]:
    """The BatchedLinear layers of a ModuleList, typed (ModuleList items are plain Modules)."""
    for layer in layers:
        if not isinstance(layer, BatchedLinear):
            raise TypeError(f"expected BatchedLinear, got {type(layer).__name__}")
        yield layer


class Experts(nn.Module):
    """E ReLU MLPs on [u, v] -> E x N x H_last.

    The first layers of all experts form one split matmul: ``u @ W_u`` (E x B_u x H1, a single
    row per expert at serving) plus ``v @ W_v`` (E x N x H1). Activations are kept expert-major
    (E x N x H) so that every layer is one batched GEMM over contiguous per-expert blocks with no
    transposes; N-major with einsum measured ~1.5x slower in onnxruntime and in training.
    """

    def __init__(
        self, user_dim: int, item_dim: int, n_experts: int, hidden: tuple[int, ...]
    ) -> None:
        super().__init__()
        positive_dims("expert hidden", hidden)
        if user_dim < 1 or item_dim < 1 or n_experts < 1:
            raise ValueError(f"Experts need positive dims, got {(user_dim, item_dim, n_experts)}")
        self.n_experts = n_experts
        fan_in, h1 = user_dim + item_dim, hidden[0]
        self.w_user = nn.Parameter(_uniform_(torch.empty(n_experts, user_dim, h1), fan_in))
        self.w_item = nn.Parameter(_uniform_(torch.empty(n_experts, item_dim, h1), fan_in))
        self.bias = nn.Parameter(_uniform_(torch.empty(n_experts, 1, h1), fan_in))
        self.rest = nn.ModuleList(
            BatchedLinear(n_experts, h_in, h_out) for h_in, h_out in pairwise(hidden)
        )
        self.out_dim = hidden[-1]

    def forward(self, u: Tensor, v: Tensor) -> Tensor:
        """u: B_u x D_u, v: N x D_i -> E x N x H_last (B_u = 1 broadcasts over N)."""
        if u.shape[0] == 1 or torch.jit.is_tracing():
            user = torch.matmul(u, self.w_user) + self.bias  # E x B_u x H1: once per request
            h = F.relu(user + torch.matmul(v, self.w_item))  # E x N x H1
        else:
            h = self._first_of_rows(u, v)
        for layer in self.rest:
            h = F.relu(layer(h))  # "enh,ehk->enk"
        return h

    def _first_of_rows(self, u: Tensor, v: Tensor) -> Tensor:
        """The first layer for training rows (B_u = N): two ``[N, D] x [D, E*H1]`` GEMMs into
        N-major rows, copied once into expert-major order (E x N x H1).

        Broadcasting u (N x D_u) against the E x D_u x H1 weights makes torch fold the product
        into one GEMM and copy its N x E x H1 result into expert-major order, forward and
        backward, in fp32. Here the one copy happens after the activation, in the autocast dtype
        (bf16: half the bytes), and the next batched layers read a contiguous block (a
        transposed view measured 47 against 36 ms forward + backward for this layer and the
        next). Same sums.
        """
        e, h1 = self.n_experts, self.w_user.shape[-1]
        w_user = self.w_user.permute(1, 0, 2).reshape(-1, e * h1)
        w_item = self.w_item.permute(1, 0, 2).reshape(-1, e * h1)
        h = torch.addmm(torch.addmm(self.bias.reshape(1, e * h1), u, w_user), v, w_item)
        return F.relu(h).view(-1, e, h1).transpose(0, 1).contiguous()


class Gates(nn.Module):
    """Per-task softmax gates over experts on [u, v] -> N x T x E (rows sum to 1).

    In training, each expert is dropped from each gate row with probability ``dropout`` and the
    remaining weights renormalised (at least one expert always stays).
    """

    def __init__(
        self,
        user_dim: int,
        item_dim: int,
        n_tasks: int,
        n_experts: int,
        temperature: float = 1.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if n_tasks < 1 or n_experts < 1:
            raise ValueError(f"Gates need n_tasks, n_experts >= 1, got {(n_tasks, n_experts)}")
        if not temperature > 0 or not 0.0 <= dropout < 1.0:
            raise ValueError("gate temperature must be > 0 and dropout in [0, 1)")
        self.n_tasks, self.n_experts = n_tasks, n_experts
        self.temperature, self.dropout = temperature, dropout
        self.logits = SplitLinear(user_dim, item_dim, n_tasks * n_experts)

    def forward(self, u: Tensor, v: Tensor) -> Tensor:
        """u: B_u x D_u, v: N x D_i -> N x T x E."""
        logits = self.logits(u, v).reshape(-1, self.n_tasks, self.n_experts) / self.temperature
        return gate_softmax(logits, self.dropout if self.training else 0.0)


def gate_softmax(logits: Tensor, dropout: float) -> Tensor:
    """Softmax over the last dim, each expert dropped with probability ``dropout`` (at least one
    kept per row) and the kept weights renormalised."""
    if dropout > 0:
        drop = torch.rand_like(logits) < dropout
        drop &= ~drop.all(dim=-1, keepdim=True)
        # -inf logits get exactly 0 weight; the softmax renormalises over the kept experts.
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.softmax(logits, dim=-1)


class Towers(nn.Module):
    """One MLP per task (batched weights): T x N x H -> logits T x N."""

    def __init__(self, in_dim: int, hidden: tuple[int, ...], n_tasks: int) -> None:
        super().__init__()
        if in_dim < 1 or n_tasks < 1 or (hidden and min(hidden) < 1):
            raise ValueError(f"bad tower dims: in={in_dim}, hidden={hidden}, tasks={n_tasks}")
        dims = (in_dim, *hidden, 1)
        self.layers = nn.ModuleList(
            BatchedLinear(n_tasks, h_in, h_out) for h_in, h_out in pairwise(dims)
        )

    def set_output_bias(self, values: Tensor) -> None:
        """Set the last layer's bias per task (T values), e.g. to the training base rates."""
        with torch.no_grad():
            self.batched_layers()[-1].bias.copy_(values.reshape(-1, 1, 1))

    def batched_layers(self) -> list[BatchedLinear]:
        """The tower layers, first to last (typed view of the ModuleList)."""
        return list(batched(self.layers))

    def forward(self, x: Tensor) -> Tensor:
        """x: T x N x H -> T x N."""
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x.squeeze(-1)


class Heads(nn.Module):
    """Logits T x N -> per-task predictions [N] plus the loss inputs ``<task>_logit`` [N].

    With ``entire_space`` (ESMM, Ma et al., SIGIR 2018) the towers of the other tasks predict
    *given a click* and the heads chain them with the click over the impression space: like
    ``p = p_click * p_like|click``, whose logit is ``-logsumexp(-a, -b, -a - b)`` for the click
    logit a and the conditional b (exact, no overflow); watch time
    ``log rate = log p_click + log rate|click = b - softplus(-a)``. A like or a watched second
    needs a click, so a rare task then learns only what it adds to the click, from every
    impression, and its prediction can never exceed p_click.

    Each (impression-space) logit then goes through a per-task affine map
    ``scale * logit + shift``, identity while training; the trainer fits it on validation data
    after training (Platt scaling, see ``calibrate_heads``) so that the exported graph predicts
    calibrated values.
    """

    watch_scale: Tensor
    calibration_scale: Tensor
    calibration_shift: Tensor

    def __init__(
        self, tasks: tuple[str, ...], watch_scale: float, entire_space: bool = False
    ) -> None:
        super().__init__()
        if entire_space and CLICK not in tasks:
            raise ValueError("entire-space heads chain every task with the click: tasks need it")
        self.tasks = tasks
        self.chain_from = tasks.index(CLICK) if entire_space else None
        self.register_buffer("watch_scale", torch.tensor(float(watch_scale)))
        self.register_buffer("calibration_scale", torch.ones(len(tasks), 1))
        self.register_buffer("calibration_shift", torch.zeros(len(tasks), 1))

    def link(self, task: str, logit: Tensor) -> Tensor:
        """The prediction for a task's (calibrated) logit."""
        if task in POISSON_TASKS:
            return self.watch_scale * torch.exp(logit)
        return torch.sigmoid(logit)

    def chained(self, logits: Tensor) -> Tensor:
        """Impression-space logits T x N: the click's as it is, every other task's chained."""
        if self.chain_from is None:
            return logits
        # The chained tasks do not train the click: their losses (watch's above all, 10-90x the
        # click's gradient) would pull p_click towards what explains their own labels.
        a = logits[self.chain_from].detach() if self.training else logits[self.chain_from]
        rows = []
        for i, task in enumerate(self.tasks):
            b = logits[i]
            if i == self.chain_from:
                rows.append(b)
            elif task in POISSON_TASKS:
                rows.append(b - F.softplus(-a))
            else:
                rows.append(-torch.logsumexp(torch.stack([-a, -b, -a - b]), 0))
        return torch.stack(rows)

    def forward(self, logits: Tensor) -> dict[str, Tensor]:
        """logits: T x N -> {task: N, task_logit: N}."""
        logits = self.chained(logits) * self.calibration_scale + self.calibration_shift
        out: dict[str, Tensor] = {}
        for i, task in enumerate(self.tasks):
            logit = logits[i]
            if task in POISSON_TASKS:
                logit = logit.clamp(WATCH_LOG_RATE_MIN, WATCH_LOG_RATE_MAX)
            out[task] = self.link(task, logit)
            out[f"{task}_logit"] = logit
        return out
