"""Where tasks help or hurt each other: per-task gradients on the shared parameters.

Negative transfer shows in the gradients before it shows in the metrics (Yu et al., NeurIPS 2020,
"Gradient Surgery"; Chen et al., ICML 2018, "GradNorm"): on a parameter group that several tasks
share, a task whose gradient is much larger steers it alone, and two tasks whose gradients point
apart (cosine < 0) undo each other's steps. ``gradient_report`` measures both, per group of the
model (the shared embeddings, the interaction tables, the experts or bottom, the gates), for the
gradient of each task's loss on a few batches, and the gates' own state (their logit spread and
gradient norm: a gate whose logits barely move has no reason to choose).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from model.training.batches import Batch
from model.training.mmoe import RankingModel
from model.training.objective import task_losses

# Parameter groups by the first component of their name (``named_parameters``).
GROUPS: dict[str, str] = {
    "embedding": "embeddings",
    "task_embeddings": "task embeddings",
    "interactions": "interaction tables",
    "experts": "experts",
    "first": "bottom",
    "rest": "bottom",
    "gates": "gates",
    "towers": "towers",
}
# Groups whose parameters are split by task (a gate per task, STEM's embedding set per task):
# two tasks' gradients there never overlap, so only their norms are reported.
PER_TASK_GROUPS = frozenset({"gates", "task embeddings"})


def parameter_groups(model: nn.Module) -> dict[str, list[Tensor]]:
    """The model's trainable parameters by group (see ``GROUPS``); per-task parts are left out
    where no other task reads them (the towers, the per-task bilinear weights and wide terms).
    """
    groups: dict[str, list[Tensor]] = {}
    for name, param in model.named_parameters():
        head = name.split(".", 1)[0]
        if head not in GROUPS or not param.requires_grad:
            continue
        if head == "towers" or name.endswith("pair_weights") or ".wide." in name:
            continue  # one slice per task: nothing shared to conflict over
        groups.setdefault(GROUPS[head], []).append(param)
    return groups


def _flat_grads(params: list[Tensor]) -> Tensor:
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    parts = [(g.to_dense() if g.is_sparse else g).reshape(-1) for g in grads]
    return torch.cat(parts)


def _task_gradients(
    model: RankingModel, batch: Batch, groups: Mapping[str, list[Tensor]]
) -> dict[str, dict[str, Tensor]]:
    """group -> task -> the flat gradient of that task's mean loss on the batch."""
    inputs, labels = batch
    losses = task_losses(model(inputs), labels)
    out: dict[str, dict[str, Tensor]] = {g: {} for g in groups}
    tasks = list(losses)
    for i, task in enumerate(tasks):
        model.zero_grad(set_to_none=True)
        losses[task].backward(retain_graph=i < len(tasks) - 1)
        for group, params in groups.items():
            out[group][task] = _flat_grads(params).clone()
    model.zero_grad(set_to_none=True)
    return out


def _cosine(a: Tensor, b: Tensor) -> float:
    na, nb = float(a.norm()), float(b.norm())
    return float(a @ b) / (na * nb) if na > 0 and nb > 0 else float("nan")


def gradient_report(model: RankingModel, batches: Iterable[Batch]) -> dict[str, Any]:
    """Per group: each task's gradient norm and each task pair's cosine, means over the batches.

    The model stays in training mode (dropout in the gates as in training) and its weights are
    not changed; gradients are cleared afterwards.
    """
    model.train()
    groups = parameter_groups(model)
    norms: dict[str, dict[str, list[float]]] = {g: {} for g in groups}
    cosines: dict[str, dict[str, list[float]]] = {g: {} for g in groups}
    n = 0
    for batch in batches:
        grads = _task_gradients(model, batch, groups)
        for group, per_task in grads.items():
            for task, g in per_task.items():
                norms[group].setdefault(task, []).append(float(g.norm()))
            pairs = () if group in PER_TASK_GROUPS else itertools.combinations(per_task, 2)
            for a, b in pairs:
                cosines[group].setdefault(f"{a}~{b}", []).append(_cosine(per_task[a], per_task[b]))
        n += 1
    return {
        "batches": n,
        "groups": {
            group: {
                "params": int(sum(p.numel() for p in groups[group])),
                "norm": {t: float(np.mean(v)) for t, v in norms[group].items()},
                "cosine": {k: float(np.nanmean(v)) for k, v in cosines[group].items()},
            }
            for group in groups
        },
    }


def report_lines(report: Mapping[str, Any]) -> list[str]:
    """A Markdown table of a ``gradient_report``."""
    groups = report["groups"]
    if not groups:
        return ["No shared parameters."]
    tasks = sorted({t for g in groups.values() for t in g["norm"]})
    pairs = sorted({p for g in groups.values() for p in g["cosine"]})
    head = (
        "| group | params | "
        + " | ".join(f"‖∇{t}‖" for t in tasks)
        + " | "
        + " | ".join(f"cos {p.replace('~', '·')}" for p in pairs)
        + " |"
    )
    lines = [head, "|" + "---|" * (2 + len(tasks) + len(pairs))]
    for name, g in groups.items():
        norms = [f"{g['norm'].get(t, float('nan')):.2e}" for t in tasks]
        cos = [f"{g['cosine'].get(p, float('nan')):+.3f}" for p in pairs]
        lines.append(f"| {name} | {g['params']:,} | " + " | ".join(norms + cos) + " |")
    return lines
