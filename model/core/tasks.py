"""The task heads every model serves, in one place (standard library only).

Each bundle predicts ``click`` (a probability), ``watch_time`` (expected watch seconds per
impression, over the whole impression space, so not conditioned on a click) and ``like`` (a
probability). The bundle checks its manifest against these, fusion validates weights against
them, the trainer builds one head per task and the exporter names one ONNX output per task.
"""

from __future__ import annotations

from typing import Final

TASKS: Final[tuple[str, ...]] = ("click", "watch_time", "like")

# How each head is described in a manifest (``{name, kind, unit}``).
TASK_KINDS: Final[tuple[str, ...]] = ("probability", "expected_value")
TASK_SPECS: Final[dict[str, dict[str, str]]] = {
    "click": {"name": "click", "kind": "probability", "unit": "probability"},
    "watch_time": {"name": "watch_time", "kind": "expected_value", "unit": "seconds"},
    "like": {"name": "like", "kind": "probability", "unit": "probability"},
}
# Heads that predict a probability (sigmoid of a logit) vs a non-negative mean (exp of a logit).
PROBABILITY_TASKS: Final[frozenset[str]] = frozenset(
    t for t, spec in TASK_SPECS.items() if spec["kind"] == "probability"
)

# Label column of each task in an impression frame (model/training/data.py).
LABEL_COLUMNS: Final[dict[str, str]] = {"click": "click", "watch_time": "watch_s", "like": "like"}
# Ground truth per impression that simulated data carries (model/simulator/world.py): the true
# click probability, expected watch seconds and like probability the labels were drawn from.
TRUTH_COLUMNS: Final[dict[str, str]] = {
    "click": "true_p_click",
    "watch_time": "true_watch_s",
    "like": "true_p_like",
}
