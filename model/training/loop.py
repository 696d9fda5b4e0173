"""The epoch loop every training run goes through, in one process or on every DDP rank.

``EpochLoop.run`` trains an epoch, averages the training loss over the processes, validates
(where the validation split lives: the one process, or rank 0), prints one progress line, asks
``EarlyStopping`` (or, for the independent networks of ``single_task`` with ``select_each``,
``TaskwiseStopping``) whether to go on and lets rank 0's answer decide for all ranks; at the end the
best epoch's weights are restored. What differs between one process and DDP comes in as two
small objects: the ``BatchSource`` (a shuffled split, or this rank's rows of the global batches)
and the ``Collective`` (identity, or all-reduce and broadcast). ``hooks`` run after every
epoch's training on every rank, e.g. a learning-rate scheduler's ``step``.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from model.core.tasks import TASKS
from model.training.balance import Balance, make_balance, shared_parameters
from model.training.batches import Batch, EncodedSplit, GateStats, predict
from model.training.config import TrainConfig
from model.training.layers import Interactions, looked_up_l2
from model.training.mmoe import RankingModel, SingleTask
from model.training.objective import (
    evaluate_split,
    selection_value,
    task_losses,
    task_selection_value,
)

PATIENCE = 1  # the first epoch that does not improve the selection value ends training
# --compile auto: compiling costs 20-50 s on 2 cores and saves ~40 % of a step of ~0.2 s
COMPILE_MIN_STEPS = 1000


class Optimizers:
    """The run's optimiser: Adam (fused) over the dense parameters, ``ActiveRowAdam`` over the
    id tables whose gradients are row-wise (``--sparse``, the default in one process).

    With dense gradients every step zero-fills, reduces and Adam-updates all ~14M table entries
    although a world uses a few thousand rows of each hashed table; row-wise gradients and Adam
    over the rows in use compute the same update (see ``ActiveRowAdam``) without the rest.
    ``param_groups`` lists both optimisers' groups, so an epoch hook that sets ``lr`` sets it
    for both (scaling it keeps the shared parameters' multiple).

    ``shared_lr`` multiplies the learning rate of the parameters every task meets
    (``balance.shared_parameters``: embeddings, interaction tables, experts or bottom; for stem
    and ple its experts include each task's own, which get the multiple too). Adam
    divides a parameter's step by the root mean square of its whole gradient, the sum of the
    tasks'; with T balanced, roughly orthogonal task gradients that sum is ~sqrt(T) times each
    task's, so each task moves a shared parameter ~sqrt(T) times slower than a single-task model
    moves its own. ``shared_lr = sqrt(T)`` gives every task a single-task model's step there.

    ``interaction_lr`` multiplies, on top, the rate of the interaction layer's id tables (its
    field vectors and first-order weights; ``interaction_tables``), where the user x field
    affinities are learnt.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        extra: Iterable[Tensor] = (),
        shared_lr: float = 1.0,
        interaction_lr: float = 1.0,
    ) -> None:
        tables = sparse_tables(model)
        ids = {id(p) for p in tables}
        dense = [p for p in model.parameters() if id(p) not in ids] + list(extra)
        multiple = dict.fromkeys((id(p) for p in shared_parameters(model)), shared_lr)
        for p in interaction_tables(model):
            multiple[id(p)] = multiple.get(id(p), 1.0) * interaction_lr
        # fused: one kernel per step instead of a chain of foreach ops (measured ~5x faster).
        self.parts: list[torch.optim.Optimizer] = [
            torch.optim.Adam(lr_groups(dense, multiple, lr), lr=lr, fused=True)
        ]
        if tables:
            self.parts.append(ActiveRowAdam(lr_groups(tables, multiple, lr), lr=lr))

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for part in self.parts for group in part.param_groups]

    def zero_grad(self) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none=True)

    def step(self) -> None:
        for part in self.parts:
            part.step()


def lr_groups(
    params: list[Tensor], multiple: Mapping[int, float], lr: float
) -> list[dict[str, Any]]:
    """``params`` as optimiser groups, one per learning-rate multiple: a parameter whose id
    ``multiple`` names learns at ``lr`` times it, the others at ``lr``."""
    groups: dict[float, list[Tensor]] = {}
    for p in params:
        groups.setdefault(multiple.get(id(p), 1.0), []).append(p)
    return [{"params": group, "lr": lr * k} for k, group in sorted(groups.items())]


def interaction_tables(model: nn.Module) -> list[Tensor]:
    """The id tables of the model's interaction layer(s) (``layers.Interactions``; single_task
    has one per task): field vectors and first-order weights."""
    return [
        m.weight
        for layer in model.modules()
        if isinstance(layer, Interactions)
        for m in layer.modules()
        if isinstance(m, nn.Embedding)
    ]


class ActiveRowAdam(torch.optim.Optimizer):
    """Adam over the rows of id tables that have ever had a gradient: dense Adam's result.

    A row that never had a gradient has Adam moments 0 and so an update of exactly 0; a row that
    had one keeps moving with its moments every step after, as in dense Adam. So updating only the
    rows seen so far (the *active* rows, kept per table) gives dense Adam's arithmetic at a cost
    proportional to the rows in use, not to the table (hashed tables of 100k-171k rows of which
    a world uses a few thousand). Takes the tables' row-wise (sparse) gradients; a row absent
    from a step's gradient gets gradient 0 that step, as in dense Adam.
    """

    def __init__(
        self,
        params: list[Tensor] | list[dict[str, Any]],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, p.grad, group)

    def _update(self, p: Tensor, grad: Tensor, group: dict[str, Any]) -> None:
        """One Adam step of table ``p`` on its active rows (``grad``: row-wise, a row may repeat;
        its values are summed as coalescing would, without sorting)."""
        state = self.state[p]
        if not state:  # moments as dense Adam's; the active rows and each row's place among them
            state.update(step=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
            state.update(active=torch.zeros(0, dtype=torch.long), place=torch.full((len(p),), -1))
        rows, values = grad._indices()[0], grad._values()
        place, active = state["place"], state["active"]
        new = rows[place[rows] < 0].unique()
        if len(new):
            place[new] = torch.arange(len(active), len(active) + len(new))
            active = state["active"] = torch.cat([active, new])
        g = values.new_zeros((len(active), p.shape[1])).index_add_(0, place[rows], values)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        t = state["step"]
        m = state["m"].index_select(0, active).mul_(beta1).add_(g, alpha=1 - beta1)
        v = state["v"].index_select(0, active).mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v.sqrt() / math.sqrt(1 - beta2**t)).add_(group["eps"])
        step = -group["lr"] / (1 - beta1**t)
        state["m"].index_copy_(0, active, m)
        state["v"].index_copy_(0, active, v)
        p.index_copy_(0, active, p.index_select(0, active).addcdiv_(m, denom, value=step))


def sparse_tables(model: nn.Module) -> list[Tensor]:
    """The weights of the model's ``nn.Embedding`` tables that produce sparse gradients."""
    return [m.weight for m in model.modules() if isinstance(m, nn.Embedding) and m.sparse]


def use_sparse_tables(model: nn.Module) -> None:
    """Make every ``nn.Embedding`` of ``model`` produce row-wise (sparse) gradients.

    Only the backward pass changes (the forward, the weights and an ONNX export are the same).
    DDP reads the flag when it wraps the model, so this runs before.
    """
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            module.sparse = True


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of the training forward pass for ``precision``, None for fp32.

    ``auto`` is bf16 where oneDNN has bf16 kernels for this CPU (AVX512-BF16 or AMX), else fp32.
    """
    if precision == "bf16" or (
        precision == "auto" and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    ):
        return torch.bfloat16
    return None


def dense_parts(module: nn.Module) -> Iterator[nn.Module]:
    """The largest submodules of ``module`` without an ``nn.Embedding`` (nor containers).

    These are what ``torch.compile`` can take: inductor cannot trace sparse gradients.
    """
    for child in module.children():
        if isinstance(child, nn.ModuleList | nn.ModuleDict) or any(
            isinstance(m, nn.Embedding) for m in child.modules()
        ):
            yield from dense_parts(child)
        else:
            yield child


@contextmanager
def compiled(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Run the block with the model's dense parts compiled in place (``nn.Module.compile``).

    Inductor fuses the experts', gates' and towers' elementwise work into their GEMMs (about
    1.8x the steps per CPU-second here), for a one-off compile of 20-50 s per shape. Afterwards
    the parts run eagerly again, so ONNX export and calibration see the plain modules.
    """
    parts = list(dense_parts(model)) if enabled else []
    for part in parts:
        part.compile()
    try:
        yield
    finally:
        for part in parts:
            part._compiled_call_impl = None  # what nn.Module.compile set


def should_compile(switch: str, total_steps: int) -> bool:
    """``--compile``: on, off, or auto = on for runs of ``COMPILE_MIN_STEPS`` steps or more."""
    return switch == "on" or (switch == "auto" and total_steps >= COMPILE_MIN_STEPS)


EpochHook = Callable[[int, Optimizers], None]  # (epoch, optimizer), every rank


class BatchSource(Protocol):
    """This process's mini-batches, one pass per epoch."""

    @property
    def rows(self) -> int:
        """Training rows held by this process."""
        ...

    @property
    def steps(self) -> int:
        """Optimiser steps per epoch (the same on every rank)."""
        ...

    def epoch(self, rng: np.random.Generator) -> Iterator[Batch]:
        """One epoch's batches; ``rng`` draws the permutation (the same stream on every rank)."""
        ...


class Collective(Protocol):
    """How the processes of a run agree: one process (``OneProcess``) or a DDP process group."""

    @property
    def world(self) -> int: ...

    @property
    def is_main(self) -> bool: ...

    def mean(self, value: float, weight: float) -> float:
        """The ``weight``-weighted mean of ``value`` over all processes."""
        ...

    def agree(self, flag: bool) -> bool:
        """The main process's ``flag``, on every process."""
        ...


@dataclass(frozen=True)
class OneProcess:
    """The ``Collective`` of a single-process run: nothing to reduce or broadcast."""

    world: int = 1
    is_main: bool = True

    def mean(self, value: float, weight: float) -> float:
        return value

    def agree(self, flag: bool) -> bool:
        return flag


@dataclass
class EarlyStopping:
    """Stop after ``patience`` epochs without a lower selection value; keep the best weights.

    The value is the epoch's validation loss, or what ``--select-by`` names
    (``objective.selection_value``). ``restore`` loads the best weights back. Until an epoch
    improves, the best weights are the initial ones (a NaN value never improves).
    """

    model: RankingModel
    patience: int = PATIENCE
    best: float = math.inf
    best_epoch: int = 0
    stale: int = 0
    best_state: dict[str, Tensor] = field(init=False)

    def __post_init__(self) -> None:
        self.best_state = copy.deepcopy(self.model.state_dict())

    def observe(self, epoch: int, value: float) -> bool:
        """Record an epoch's selection value; True when it improved (its weights are kept)."""
        if value < self.best:
            self.best, self.best_epoch, self.stale = value, epoch, 0
            self.best_state = copy.deepcopy(self.model.state_dict())
            return True
        self.stale += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.stale >= self.patience

    def restore(self) -> None:
        """Load the best weights back into the model."""
        self.model.load_state_dict(self.best_state)

    def observe_record(self, epoch: int, record: Mapping[str, float], config: TrainConfig) -> bool:
        """``observe`` the selection value of an epoch's validation ``record``."""
        return self.observe(epoch, selection_value(record, config.loss_weights, config.select_by))

    def kept_loss(self, history: list[dict[str, float]]) -> float:
        """The validation loss of the weights kept (inf when no epoch improved)."""
        return history[self.best_epoch - 1]["loss"] if self.best_epoch else math.inf


@dataclass
class TaskwiseStopping:
    """Early stopping of each task's own network, for ``single_task`` with ``select_each``.

    The T networks of ``single_task`` share no parameter, so stopping each on its own
    validation value (``objective.task_selection_value``: its loss, or its ranking metric) and
    keeping its own best epoch gives exactly the T models one would train and stop separately.
    A network that has stopped observes no later epoch (it would not have been trained on);
    training goes on while any of them has not stopped, and the stopped ones' later epochs are
    discarded.
    """

    model: SingleTask
    weights: Mapping[str, float]  # the loss weights the kept networks' validation loss adds with
    patience: int = PATIENCE
    stoppers: dict[str, EarlyStopping] = field(init=False)

    def __post_init__(self) -> None:
        nets = self.model.task_models()
        self.stoppers = {t: EarlyStopping(net, self.patience) for t, net in nets.items()}

    def observe_record(self, epoch: int, record: Mapping[str, float], config: TrainConfig) -> bool:
        """Observe each running network's own value; True when any of them improved."""
        improved = [
            stopper.observe(epoch, task_selection_value(record, task, config.select_by))
            for task, stopper in self.stoppers.items()
            if not stopper.should_stop
        ]
        return any(improved)

    @property
    def should_stop(self) -> bool:
        return all(s.should_stop for s in self.stoppers.values())

    @property
    def best_epochs(self) -> dict[str, int]:
        return {t: s.best_epoch for t, s in self.stoppers.items()}

    def restore(self) -> None:
        for stopper in self.stoppers.values():
            stopper.restore()

    def kept_loss(self, history: list[dict[str, float]]) -> float:
        """The weighted validation loss of the networks kept, each at its own epoch (exact:
        a network's predictions do not depend on the others')."""
        epochs = self.best_epochs
        if not all(epochs.values()):
            return math.inf
        return sum(self.weights[t] * history[e - 1][f"loss_{t}"] for t, e in epochs.items())


def stopping(model: RankingModel, config: TrainConfig) -> EarlyStopping | TaskwiseStopping:
    """Each task's network stopped on its own (``single_task`` with ``select_each``), or the
    model on the selection value of all tasks."""
    if config.select_each and isinstance(model, SingleTask):
        return TaskwiseStopping(model, config.loss_weights)
    return EarlyStopping(model)


@dataclass
class Epochs:
    """What the loop hands to ``finalise`` (meaningful on the process that validated)."""

    history: list[dict[str, float]]  # per epoch: epoch, train losses and the validation metrics
    best_loss: float  # the validation loss of the epoch kept (inf when none was)
    gate_diagnostics: dict[str, Any] | None  # of the validation split, under the best weights
    train_time_s: float


@dataclass(frozen=True)
class Step:
    """How one optimiser step runs: how the task losses combine (model/training/balance.py) and
    the forward pass's autocast dtype.
    """

    balance: Balance
    autocast: torch.dtype | None = None  # None: fp32
    id_l2: float = 0.0  # weight of the looked-up id rows' L2 (layers.looked_up_l2)

    def precision(self) -> torch.autocast:
        """The forward pass's autocast context (disabled for fp32)."""
        return torch.autocast("cpu", self.autocast or torch.bfloat16, self.autocast is not None)

    def losses(self, module: nn.Module, batch: Batch) -> dict[str, Tensor]:
        """Forward (under autocast, if any) and the per-task losses, computed in fp32."""
        inputs, labels = batch
        with self.precision():
            out = module(inputs)
        return task_losses({k: v.float() for k, v in out.items()}, labels)

    def run(
        self,
        module: nn.Module,
        batch: Batch,
        optimizer: Optimizers,
        mark: Callable[[str], None] | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """One optimiser step on ``batch``; -> (weighted loss, per-task losses), detached.

        ``mark`` (a benchmark's clock) is called after each phase: forward, backward, optimiser.
        """
        with self.precision():
            self.balance.before_step(batch)  # a measuring balance runs as the step does
        losses = self.losses(module, batch)
        loss = self.balance.combine(losses, batch[1])
        if self.id_l2:
            loss = loss + self.id_l2 * looked_up_l2(module, batch[0])
        if mark:
            mark("forward")
        optimizer.zero_grad()
        loss.backward()
        if mark:
            mark("backward")
        optimizer.step()
        if mark:
            mark("optimiser")
        return loss.detach(), {k: v.detach() for k, v in losses.items()}


def train_epoch(
    module: nn.Module,
    batches: Iterable[Batch],
    optimizer: Optimizers,
    step: Step,
    n_batches: int | None = None,
    desc: str = "train",
) -> dict[str, float]:
    """One pass over ``batches`` (this rank's share); returns the mean training losses.

    ``{"train_loss": the balanced loss, "train_loss_<task>": each task's}`` (the report draws
    the per-task curves). ``module`` is a ranking model or its DistributedDataParallel wrapper.
    The losses are summed as tensors and read once at the end: a ``.item()`` per step would
    cost a synchronising call per task per step.
    """
    module.train()
    # Every key from the start: under DDP each rank averages the same keys, even with no batch.
    keys = ("train_loss", *(f"train_loss_{t}" for t in TASKS))
    totals = torch.zeros(len(keys), dtype=torch.float64)
    seen = 0
    bar = tqdm(batches, total=n_batches, desc=desc, disable=None, leave=False, unit="batch")
    for batch in bar:
        loss, losses = step.run(module, batch, optimizer)
        n = len(batch[1]["click"])
        totals += torch.stack([loss, *losses.values()]) * n
        seen += n
    return {key: float(total) / max(seen, 1) for key, total in zip(keys, totals, strict=True)}


def epoch_line(record: Mapping[str, float], secs: float, world: int = 1) -> str:
    """The progress line of one epoch (``record``: an entry of ``Epochs.history``)."""
    ranks = f" ({world} ranks)" if world > 1 else ""
    return (
        f"epoch {record['epoch']:.0f}{ranks}: train loss {record['train_loss']:.4f} | "
        f"valid loss {record['loss']:.4f} "
        f"click AUC {record['click_auc']:.4f} like AUC {record['like_auc']:.4f} "
        f"watch RMSE {record['watch_rmse']:.2f}s XAUC {record['watch_xauc']:.4f} | {secs:.1f}s"
    )


def training_step(model: RankingModel, config: TrainConfig) -> tuple[Step, Optimizers]:
    """The step (loss balance, precision, id L2) and the optimiser ``config`` trains ``model``
    with: what every run's loop, and the training benchmark, step."""
    balance = make_balance(config.loss_balance or "fixed", model, config.loss_weights)
    optimizer = Optimizers(
        model,
        config.lr,
        extra=balance.trainable(),
        shared_lr=float(config.shared_lr or 1.0),
        interaction_lr=config.interaction_lr,
    )
    return Step(balance, autocast_dtype(config.precision), config.id_l2), optimizer


@dataclass
class EpochLoop:
    """Up to ``config.epochs`` epochs of Adam with early stopping on the validation split (its
    loss, or what ``config.select_by`` names)."""

    model: RankingModel
    config: TrainConfig
    collective: Collective = field(default_factory=OneProcess)
    module: torch.nn.Module | None = None  # what batches run through (DDP wrapper); None: model
    verbose: bool = True
    hooks: list[EpochHook] = field(default_factory=list)

    def run(self, batches: BatchSource, valid: EncodedSplit | None) -> Epochs:
        """Train; validate on ``valid`` where it is given (None on ranks other than 0)."""
        step, optimizer = training_step(self.model, self.config)
        rng = np.random.default_rng(self.config.seed)  # the same permutations on every rank
        stopper = stopping(self.model, self.config)
        module = self.model if self.module is None else self.module
        history: list[dict[str, float]] = []
        gates: dict[str, Any] | None = None
        started = time.perf_counter()
        fast = should_compile(self.config.compile, batches.steps * self.config.epochs)
        with compiled(self.model, fast):
            for epoch in range(1, self.config.epochs + 1):
                t0 = time.perf_counter()
                losses = train_epoch(
                    module, batches.epoch(rng), optimizer, step, batches.steps, f"epoch {epoch}"
                )
                record: dict[str, float] = {"epoch": epoch}
                record.update({k: self.collective.mean(v, batches.rows) for k, v in losses.items()})
                for hook in self.hooks:
                    hook(epoch, optimizer)
                if valid is not None:
                    gate_stats = GateStats()
                    preds = predict(self.model, valid, gate_stats)
                    record.update(evaluate_split(preds, valid, self.config.loss_weights))
                    history.append(record)
                    if self.verbose:
                        print(epoch_line(record, time.perf_counter() - t0, self.collective.world))
                    if stopper.observe_record(epoch, record, self.config) and gate_stats.rows:
                        gates = gate_stats.diagnostics(self.model.config.tasks)
                if not self.collective.agree(not stopper.should_stop):
                    break
        train_time = time.perf_counter() - started
        if valid is not None:
            stopper.restore()
        return Epochs(history, stopper.kept_loss(history), gates, train_time)
