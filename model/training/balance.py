"""How the task losses add up to the one loss a step minimises (``--loss-balance``).

``fixed``        sum_t w_t L_t with the ``--loss-weights`` (1 each by default).
``uncertainty``  Kendall, Gal & Cipolla (CVPR 2018): sum_t w_t (exp(-s_t) L'_t + s_t) with a
                 learnt s_t = log sigma_t^2 per task; at its optimum exp(-s_t) = 1 / L'_t, so every
                 task's loss is weighed by its inverse. L'_t is the loss above its floor (the
                 Poisson NLL minus the saturated model's, i.e. half the deviance; BCE's floor on
                 0/1 labels is 0), so that L'_t >= 0 as the form needs.
``gradnorm``     GradNorm's aim (Chen et al., ICML 2018) with alpha = 0, solved in closed form:
                 every ``GRADNORM_EVERY`` steps each task's gradient norm on the parameters all
                 tasks share is measured on the step's batch, and the weights become
                 w_t ∝ 1 / ||grad L_t|| (mean 1, smoothed), so that no task steers the shared
                 parameters alone. model/training/analysis/transfer.py measures the imbalance it
                 removes.

Validation, early stopping and the reported losses always use the fixed ``--loss-weights``, so
epochs and runs stay comparable whatever balance trained them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import torch
from torch import Tensor, nn

from model.training.batches import Batch
from model.training.mmoe import RankingModel
from model.training.objective import task_losses, weighted_sum

BALANCES: tuple[str, ...] = ("fixed", "uncertainty", "gradnorm")
# Steps between two measurements of the task gradient norms: a measurement is a forward and one
# backward per task over every shared parameter (~220 ms, 3.5 steps' time): every 25 steps that
# cost 8 % of training's speed, every 100 it adds ~2.2 ms a step (~3.5 %; benchmarks/training.py,
# bf16+gradnorm vs bf16).
GRADNORM_EVERY = 100
GRADNORM_SMOOTHING = 0.5  # weight of the newest measurement in the running weights
SHARED_GROUPS = ("embedding", "interactions", "experts", "first", "rest")  # see transfer.GROUPS


class Balance(Protocol):
    """Turns a batch's task losses into the loss to minimise; may learn or measure as it goes."""

    def combine(self, losses: Mapping[str, Tensor], labels: Mapping[str, Tensor]) -> Tensor: ...

    def before_step(self, batch: Batch) -> None:
        """Called with every batch before its forward pass."""
        ...

    def trainable(self) -> list[nn.Parameter]:
        """Parameters the optimiser should train besides the model's."""
        ...

    def weights(self) -> dict[str, float]:
        """The current effective weight of each task (for the progress report)."""
        ...


class FixedWeights:
    """sum_t w_t L_t."""

    def __init__(self, weights: Mapping[str, float]) -> None:
        self._weights = dict(weights)

    def combine(self, losses: Mapping[str, Tensor], labels: Mapping[str, Tensor]) -> Tensor:
        return weighted_sum(losses, self._weights)

    def before_step(self, batch: Batch) -> None:
        return None

    def trainable(self) -> list[nn.Parameter]:
        return []

    def weights(self) -> dict[str, float]:
        return dict(self._weights)


def loss_floor(task: str, label: Tensor) -> Tensor:
    """The lowest mean loss any prediction reaches on these labels (0 for BCE on 0/1 labels)."""
    if task != "watch_time":
        return label.new_zeros(())
    # Poisson NLL (log input, no Stirling term) at mu = y: y - y log y, with 0 log 0 = 0.
    return (label - torch.special.xlogy(label, label)).mean()


class UncertaintyWeights(nn.Module):
    """Kendall et al.'s homoscedastic-uncertainty weighting with one learnt s_t per task."""

    def __init__(self, weights: Mapping[str, float]) -> None:
        super().__init__()
        self.tasks = tuple(weights)
        self.base = dict(weights)
        self.log_vars = nn.Parameter(torch.zeros(len(self.tasks)))

    def combine(self, losses: Mapping[str, Tensor], labels: Mapping[str, Tensor]) -> Tensor:
        terms = []
        for i, task in enumerate(self.tasks):
            above = (losses[task] - loss_floor(task, labels[task])).clamp_min(0.0)
            s = self.log_vars[i]
            terms.append(self.base[task] * (torch.exp(-s) * above + s))
        return torch.stack(terms).sum()

    def before_step(self, batch: Batch) -> None:
        return None

    def trainable(self) -> list[nn.Parameter]:
        return [self.log_vars]

    def weights(self) -> dict[str, float]:
        scale = torch.exp(-self.log_vars.detach())
        return {t: self.base[t] * float(scale[i]) for i, t in enumerate(self.tasks)}


def shared_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the task losses meet on: the shared embeddings, the interaction tables
    (less their per-task slices) and the experts or bottom. For ``stem`` and ``ple`` the experts
    include each task's own, which only that task reaches: its norm then counts its own experts
    as well.
    """
    return [
        p
        for name, p in model.named_parameters()
        if name.split(".", 1)[0] in SHARED_GROUPS
        and p.requires_grad
        and not name.endswith("pair_weights")
        and ".wide." not in name
    ]


class GradNormWeights:
    """Weights that equalise the task gradient norms on the shared parameters (see module doc)."""

    def __init__(self, model: RankingModel, weights: Mapping[str, float]) -> None:
        self.model = model
        self.base = dict(weights)
        self.current = dict(weights)
        self.shared = shared_parameters(model)
        self.steps = 0  # steps seen: the norms are measured every GRADNORM_EVERY

    def combine(self, losses: Mapping[str, Tensor], labels: Mapping[str, Tensor]) -> Tensor:
        return weighted_sum(losses, self.current)

    def before_step(self, batch: Batch) -> None:
        step, self.steps = self.steps, self.steps + 1
        if step % GRADNORM_EVERY or not self.shared:
            return
        norms = self._task_norms(batch)
        if not all(n > 0 for n in norms.values()):
            return
        inverse = {t: self.base[t] / n for t, n in norms.items()}
        mean = sum(inverse.values()) / len(inverse)
        for task, value in inverse.items():
            new = value / mean
            old = self.current[task] if step else new
            self.current[task] = (1 - GRADNORM_SMOOTHING) * old + GRADNORM_SMOOTHING * new

    def _task_norms(self, batch: Batch) -> dict[str, float]:
        inputs, labels = batch
        losses = task_losses({k: v.float() for k, v in self.model(inputs).items()}, labels)
        tasks = [t for t in self.base if self.base[t] > 0]
        norms = {}
        for i, task in enumerate(tasks):
            grads = torch.autograd.grad(
                losses[task], self.shared, retain_graph=i < len(tasks) - 1, allow_unused=True
            )
            squares = (_dense(g).pow(2).sum() for g in grads if g is not None)
            norms[task] = float(torch.sqrt(sum(squares, torch.zeros(()))))
        return norms

    def trainable(self) -> list[nn.Parameter]:
        return []

    def weights(self) -> dict[str, float]:
        return dict(self.current)


def _dense(grad: Tensor) -> Tensor:
    """The stored values of a gradient (row-wise for ``--sparse`` id tables)."""
    return grad.coalesce().values() if grad.is_sparse else grad


def make_balance(name: str, model: RankingModel, weights: Mapping[str, float]) -> Balance:
    """The ``--loss-balance`` named ``name`` over the fixed ``weights``."""
    if name == "fixed":
        return FixedWeights(weights)
    if name == "uncertainty":
        return UncertaintyWeights(weights)
    if name == "gradnorm":
        return GradNormWeights(model, weights)
    raise ValueError(f"--loss-balance must be one of {BALANCES}, got {name!r}")
