"""Platt scaling of every head on held-out data, stored in the model (so in the exported graph).

Per head, the affine map ``scale * logit + shift`` that minimises the head's own loss (BCE for
probabilities, Poisson NLL for watch time) on a held-out split. It fixes what training leaves: a
rare head's held-out mean runs high when its logits are noisier than the truth (the sigmoid is
convex below p = 0.5, so noise raises the mean probability -- the like head ran ~8-10% high), and
base rates drift a little between the training days and later ones. Ranking within a head is
unchanged (the map is increasing unless the scale fits negative).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F  # noqa: N812 -- the conventional alias

from model.training.batches import EncodedSplit, predict
from model.training.layers import POISSON_TASKS
from model.training.mmoe import RankingModel

Calibration = dict[str, dict[str, float]]  # per head: {"scale": a, "shift": b}


def fit_affine(logits: Tensor, labels: Tensor, poisson: bool) -> tuple[float, float]:
    """(scale, shift) minimising the head's loss of ``scale * logits + shift`` (float64 LBFGS).

    Fitted on standardised logits: a rare head's logits sit far from 0 with a small spread,
    which makes scale and shift nearly collinear in the raw parametrisation.
    """
    logits, labels = logits.double(), labels.double()
    mean, std = logits.mean(), logits.std().clamp_min(1e-6)
    z = (logits - mean) / std
    params = torch.tensor([std.item(), mean.item()], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [params], max_iter=200, tolerance_grad=1e-10, line_search_fn="strong_wolfe"
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        fitted = params[0] * z + params[1]
        if poisson:
            loss = F.poisson_nll_loss(fitted, labels, log_input=True, full=False)
        else:
            loss = F.binary_cross_entropy_with_logits(fitted, labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    a, b = (float(x) for x in params.detach())
    return a / std.item(), b - a * mean.item() / std.item()


def calibrate_heads(model: RankingModel, split: EncodedSplit) -> Calibration:
    """Fit each head's affine map on ``split``, store it in ``model.heads``; return the maps."""
    heads = model.heads
    with torch.no_grad():
        heads.calibration_scale.fill_(1.0)
        heads.calibration_shift.fill_(0.0)
    raw = predict(model, split)
    fitted: Calibration = {}
    for i, task in enumerate(model.config.tasks):
        logits = torch.from_numpy(raw[f"{task}_logit"])
        scale, shift = fit_affine(logits, split.labels[task], task in POISSON_TASKS)
        with torch.no_grad():
            heads.calibration_scale[i] = scale
            heads.calibration_shift[i] = shift
        fitted[task] = {"scale": scale, "shift": shift}
    return fitted
