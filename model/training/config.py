"""The options of a training run, parsed and validated once (at the CLI, or by whoever builds them).

``TrainConfig`` is how to fit - what ``fit`` and every DDP rank run with; ``TrainJob`` is what
``vidrank train`` does around it: where the impressions come from, how many processes, where and
how to publish. Both are frozen and checked on construction, so a bad option fails before any
data is read, with a message naming the flag.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from model.core.registry import check_version_name
from model.core.tasks import TASKS
from model.simulator.world import PRESETS
from model.training.balance import BALANCES
from model.training.mmoe import ARCHS, DEFAULT_INTERACTIONS, INTERACTIONS, MMoEConfig

MIN_SIMULATED = 10  # fewer impressions cannot be split into train/valid/test
PRECISIONS: tuple[str, ...] = ("auto", "bf16", "fp32")  # auto: bf16 where the CPU has it
SWITCHES: tuple[str, ...] = ("auto", "on", "off")  # auto: on where it pays (see the loop)
# What early stopping judges an epoch by on the validation split (objective.selection_value):
# its loss, or the loss-weighted mean of its ranking metrics (click AUC, watch XAUC, like AUC).
SELECTIONS: tuple[str, ...] = ("loss", "auc")


# What an architecture trains with unless told otherwise: the recipe that makes a multi-gate
# model's gates choose. Task gradient norms balanced on the shared parameters (they differ
# 10-90x otherwise: watch time's Poisson gradient steers them alone) and gates at temperature
# 0.1, which lets them leave the uniform mixture within the first epochs (README "Model quality",
# section 3). MMoE as Ma et al. published it (fixed weights, temperature 1) is
# `--loss-balance fixed --gate-temperature 1 --shared-lr 1` (`mmoe:paper` in an experiment).
# Every mixture of experts (omoe, mmoe, ple, stem) trains with the recipe: measured on OMoE and
# PLE as well, it lifts each of them in every world (README "Model quality", section 4); the
# gate-less baselines (single_task, shared_bottom) keep fixed weights and one rate.
#
# The shared parameters learn at sqrt(T) times the learning rate (T = 3 tasks): under Adam, T
# balanced task gradients summed on a parameter move it ~sqrt(T) times slower per task than a
# single-task model moves its own (loop.Optimizers), and at the trainer's scale most of what
# is learnt is learnt in the first epoch (README "Model quality", section 4).
#
# Click weighs four times each other task (in GradNorm's targets, so click's gradient on the
# shared parameters is four times theirs, and in the validation value that picks the epoch):
# click is the task every fused ranking starts from (no watched second and no like without a
# click) and the only one labelled on every impression. Weight 2 against 1 each lifted click
# and fused NDCG@10 where tasks differ (README "Model quality", section 5); of 2, 3, 4 and 8,
# measured on seeds 0-4 and checked on seeds 5-9 that the choice never saw, 4 lifts click over
# 2 in every seed where tasks differ, and like and fused NDCG@10 on average with it; where
# they are identical it costs click a little and ties on NDCG@10 (section 11).
SHARED_LR = math.sqrt(len(TASKS))
CLICK_FIRST: dict[str, float] = {"click": 4.0, "watch_time": 1.0, "like": 1.0}
MIXTURE_RECIPE: dict[str, object] = {
    "loss_balance": "gradnorm",
    "gate_temperature": 0.1,
    "shared_lr": SHARED_LR,
    "loss_weights": CLICK_FIRST,
}
ARCH_DEFAULTS: dict[str, dict[str, object]] = dict.fromkeys(
    ("omoe", "mmoe", "ple", "stem"), MIXTURE_RECIPE
)


def default_loss_weights() -> dict[str, float]:
    """Weight 1 for every task."""
    return dict.fromkeys(TASKS, 1.0)


def parse_loss_weights(text: str) -> dict[str, float]:
    """``"click=1,watch_time=0.5"`` -> per-task weights; tasks not named keep weight 1; ``""``
    -> ``{}``, the architecture's own (``TrainConfig``)."""
    if not text.strip():
        return {}
    weights = default_loss_weights()
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in weights:
            raise ValueError(f"--loss-weights {part!r}: expected task=weight, a task in {TASKS}")
        try:
            weights[name] = float(value)
        except ValueError:
            raise ValueError(
                f"--loss-weights {part!r}: {value.strip()!r} is not a number"
            ) from None
    _check_loss_weights(weights)
    return weights


def parse_interactions(text: str) -> tuple[str, ...]:
    """``"dots,bilinear"`` -> ("dots", "bilinear"); ``"none"`` (or "") -> no interaction layer."""
    names = tuple(filter(None, (p.strip() for p in text.split(","))))
    return () if names == ("none",) else names


def _check_loss_weights(weights: dict[str, float]) -> None:
    unknown = sorted(set(weights) - set(TASKS))
    if unknown:
        raise ValueError(f"--loss-weights: unknown task(s) {unknown}; tasks are {TASKS}")
    for task, w in weights.items():
        if not (math.isfinite(w) and w >= 0):
            raise ValueError(f"--loss-weights: {task}={w} must be a finite number >= 0")


@dataclass(frozen=True)
class TrainConfig:
    """How to fit: architecture, interaction layer, epochs, seed, batch size, lr, loss weights.

    ``interactions`` and ``interaction_dim`` configure the explicit user x item interaction layer
    every architecture shares (model/training/mmoe.py ``Interactions``; the default was chosen
    by held-out measurements, README "Model quality"). ``loss_weights`` names a weight per task;
    tasks left out weigh 1 (the stored dict always holds every task, in ``TASKS`` order); left
    empty, the architecture's own (``ARCH_DEFAULTS``: click 4 for the mixtures, else 1 each).
    Training is deterministic per seed on a machine.
    """

    arch: str = "mmoe"
    small: bool = False  # MMoEConfig.small(): a tiny network for tests
    interactions: tuple[str, ...] = DEFAULT_INTERACTIONS
    interaction_dim: int = 32
    epochs: int = 3  # at most: early stopping may end sooner
    seed: int = 0
    batch_size: int = 2048
    lr: float = 2e-3
    loss_weights: dict[str, float] = field(default_factory=dict)  # {}: the architecture's
    # How the task losses combine (model/training/balance.py) and the gates' softmax temperature
    # (< 1: sharper gates that move faster); None = the architecture's own (ARCH_DEFAULTS).
    loss_balance: str | None = None
    gate_temperature: float | None = None
    # probability an expert is dropped from a gate's mixture in training (YouTube's expert dropout
    # against gate polarisation); the network's default, 0.1, measured best of 0 / 0.1 / 0.25
    gate_dropout: float = MMoEConfig.gate_dropout
    # learning-rate multiple of the parameters every task shares (loop.Optimizers); None = the
    # architecture's own (ARCH_DEFAULTS), 1 for the others
    shared_lr: float | None = None
    # Learning-rate multiple of the interaction layer's id tables, on top of shared_lr
    # (loop.Optimizers), and what early stopping keeps the epoch by (SELECTIONS). Together, for
    # every architecture: the tables learn the user x field affinities in the first pass at
    # twice their rate, and the epoch kept is the one that ranks best (the loss-weighted mean
    # of click AUC, watch XAUC and like AUC), not the one with the lowest loss -- at 1M the
    # second epoch ranks better on every task while its loss is higher. Measured over ten
    # seeds at 300k and two at 1M against 1 / "loss" (README "Model quality", section 8).
    interaction_lr: float = 2.0
    select_by: str = "auc"
    # single_task only: each task's network keeps its own best epoch by its own value (its
    # ranking metric or loss), as separately trained models would; False: the epoch of the
    # best joint value, as every multi-task model is kept (loop.TaskwiseStopping)
    select_each: bool = False
    # Watch and like heads chained with the click (ESMM; model/training/layers.py Heads).
    entire_space: bool | None = None
    ple_levels: int = 1  # PLE's extraction levels: 1 (CGC) or 2 (model/training/mmoe.py)
    # OMoE's and MMoE's number of shared experts; None = the network's own (8; 4 with ``small``)
    experts: int | None = None
    # id tables: row-wise (sparse) gradients and Adam over the rows in use (dense Adam's result,
    # loop.ActiveRowAdam), or dense gradients and Adam over whole tables; None: row-wise in one
    # process, dense under DDP (whose all-reduce takes dense gradient buckets)
    sparse: bool | None = None
    # of the forward pass in training: fp32, bf16 (autocast) or auto (bf16 where the CPU has bf16
    # kernels: 1.18x the step's speed on this Zen 4, held-out metrics equal to 1e-4 at 1M)
    precision: str = "auto"
    compile: str = "off"  # torch.compile the dense parts: on, off, auto (long runs only)
    # L2 on the id-table rows each training impression looks up, added to the loss with this
    # weight (model/training/layers.py looked_up_l2); 0 = none
    id_l2: float = 0.0

    def _fill_defaults(self) -> None:
        """Frozen: fill what was left None with the architecture's own default (ARCH_DEFAULTS),
        else fixed weights, temperature 1, one rate and independent heads."""
        for name, value in ARCH_DEFAULTS.get(self.arch, {}).items():
            if getattr(self, name) in (None, {}):
                object.__setattr__(self, name, dict(value) if isinstance(value, dict) else value)
        fallbacks = {
            "loss_balance": "fixed",
            "gate_temperature": 1.0,
            "shared_lr": 1.0,
            "entire_space": False,
        }
        for name, value in fallbacks.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)

    def __post_init__(self) -> None:
        self._fill_defaults()
        if self.entire_space and self.arch == "single_task":
            raise ValueError("--entire-space chains heads across tasks: not with single_task")
        if self.loss_balance not in BALANCES:
            raise ValueError(f"--loss-balance must be one of {BALANCES}, got {self.loss_balance!r}")
        if self.arch not in ARCHS:
            raise ValueError(f"--arch must be one of {ARCHS}, got {self.arch!r}")
        temperature = float(self.gate_temperature or 0.0)
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"--gate-temperature must be > 0, got {self.gate_temperature}")
        if not 0.0 <= self.gate_dropout < 1.0:
            raise ValueError(f"--gate-dropout must be in [0, 1), got {self.gate_dropout}")
        if self.experts is not None and self.experts < 1:
            raise ValueError(f"--experts must be >= 1, got {self.experts}")
        unknown = [i for i in self.interactions if i not in INTERACTIONS]
        if unknown or len(set(self.interactions)) != len(self.interactions):
            raise ValueError(
                f"--interactions must be distinct names from {INTERACTIONS} (or 'none'),"
                f" got {list(self.interactions)}"
            )
        if self.interaction_dim < 1:
            raise ValueError(f"--interaction-dim must be >= 1, got {self.interaction_dim}")
        for flag, value in (
            ("--shared-lr", self.shared_lr),
            ("--interaction-lr", self.interaction_lr),
        ):
            rate = float(value or 0.0)
            if not (rate > 0 and math.isfinite(rate)):
                raise ValueError(f"{flag} must be a finite number > 0, got {value}")
        if self.ple_levels not in (1, 2) or (self.ple_levels == 2 and self.arch != "ple"):
            raise ValueError(f"--ple-levels must be 1, or 2 with --arch ple, got {self.ple_levels}")
        if self.epochs < 1:
            raise ValueError(f"--epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"--lr must be a finite number > 0, got {self.lr}")
        if not (self.id_l2 >= 0 and math.isfinite(self.id_l2)):
            raise ValueError(f"--id-l2 must be a finite number >= 0, got {self.id_l2}")
        if self.select_by not in SELECTIONS:
            raise ValueError(f"--select-by must be one of {SELECTIONS}, got {self.select_by!r}")
        if self.select_each and self.arch != "single_task":
            raise ValueError("--select-each stops each task's own network: only with single_task")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.compile not in SWITCHES:
            raise ValueError(f"--compile must be one of {SWITCHES}, got {self.compile!r}")
        _check_loss_weights(self.loss_weights)
        # Frozen: fill the tasks left out (weight 1) through object.__setattr__, in TASKS order.
        full = {t: float(self.loss_weights.get(t, 1.0)) for t in TASKS}
        object.__setattr__(self, "loss_weights", full)


STREAM_MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class TrainJob:
    """One ``vidrank train``: the data, the fit, the processes and the publishing."""

    registry: Path
    data: Path | None = None  # logs in KuaiRand's schema, or prepared DDP data
    simulate: int | None = None  # ... or this many simulated impressions
    preset: str = "default"  # ... of this simulator preset (model/simulator/world.py)
    train: TrainConfig = field(default_factory=TrainConfig)
    version: str | None = None  # default: a UTC timestamp
    activate: bool | None = None  # None: only when the registry has no production model
    if_empty: bool = False  # do nothing when a production model exists
    nproc: int = 1  # DDP processes on this machine
    quantize: bool = False  # publish the int8 graph (if the held-out AUC allows)
    stream: str = "auto"  # --data logs streamed: on, off, auto (large Parquet logs; stream.py)

    def __post_init__(self) -> None:
        if (self.data is None) == (self.simulate is None):
            raise ValueError("give exactly one of --data DIR or --simulate N")
        if self.simulate is not None and self.simulate < MIN_SIMULATED:
            raise ValueError(f"--simulate needs at least {MIN_SIMULATED} impressions")
        if self.preset not in PRESETS:
            raise ValueError(f"--preset must be one of {list(PRESETS)}, got {self.preset!r}")
        if self.preset != "default" and self.simulate is None:
            raise ValueError("--preset names a simulated world: it needs --simulate N")
        if self.nproc < 1:
            raise ValueError(f"--nproc must be >= 1, got {self.nproc}")
        if self.stream not in STREAM_MODES:
            raise ValueError(f"--stream must be one of {list(STREAM_MODES)}, got {self.stream!r}")
        if self.stream == "on" and self.data is None:
            raise ValueError("--stream on reads --data DIR; --simulate N is held in memory")
        if self.nproc > 1 and self.train.sparse:
            # DDP's weighted all-reduce hook works on dense gradient buckets.
            raise ValueError("--sparse trains in one process; use --dense with --nproc")
        if self.version is not None:
            check_version_name(self.version)  # InvalidVersionName is a ValueError

    @property
    def data_description(self) -> str:
        """Where the impressions came from, as the manifest records it."""
        if self.data is not None:
            return str(self.data)
        suffix = "" if self.preset == "default" else f":{self.preset}"
        return f"simulated:{self.simulate}{suffix}"
