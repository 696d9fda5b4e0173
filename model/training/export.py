"""ONNX export of a trained ranking model, and the torch-vs-onnxruntime parity check.

The exported graph is request-shaped (see docs/internals.md): inputs in
``schema.input_specs()`` order and names, user/context tensors with batch 1, item tensors with a
dynamic batch "N"; outputs ``click``, ``watch_time``, ``like``, each float32 [N].

Variants of the same function:

``fused`` (published)
    the user side is embedded once and its part of every first layer (all experts and the gates)
    is one row ``u @ W_u``, computed once per request and broadcast over the candidates; the rest
    is laid out for onnxruntime's CPU kernels (:class:`ServingMMoE`): per-expert 2-D GEMMs that
    fuse bias and ReLU, and the gate mixture as one batched matmul. A shared-bottom model is
    exported as trained.
``trained`` (benchmark reference)
    the trained module traced as it is: batched 3-D matmuls over experts and a broadcast
    mixture; what ``fused`` was before it was laid out for onnxruntime.
``naive`` (benchmark baseline)
    the graph as usually written: user/context inputs tiled to N rows, one Linear per expert and
    per gate over the full concatenated input. Same weights, same outputs (within float error).

The legacy TorchScript exporter (``dynamo=False``) is used: it handles this model directly and
exports in about a second, while the dynamo exporter needs more setup and time for no gain here.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import Tensor, nn

from model.core.bundle import normalise_dtype
from model.core.features import FeatureSchema
from model.core.runtime import make_session
from model.core.tasks import PROBABILITY_TASKS, TASKS
from model.training.layers import batched
from model.training.mmoe import MMoE, RankingModel, add_task_terms

if TYPE_CHECKING:
    import pandas as pd

OUTPUTS: tuple[str, ...] = TASKS  # the bundle's heads, in the graph's output order
PROB_OUTPUTS: tuple[str, ...] = tuple(t for t in TASKS if t in PROBABILITY_TASKS)
DEFAULT_OPSET = 17
Variant = Literal["fused", "naive", "trained"]


# -- serving graphs ----------------------------------------------------------------------------


class ServingGraph(nn.Module):
    """Positional-input wrapper: (inputs in ``input_names`` order) -> (click, watch_time, like)."""

    def __init__(self, model: nn.Module, input_names: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.input_names = list(input_names)

    def forward(self, *inputs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Each output is N (float32)."""
        out = self.model(dict(zip(self.input_names, inputs, strict=True)))
        return out["click"], out["watch_time"], out["like"]


def _linear(weight_in_out: Tensor, bias: Tensor) -> nn.Linear:
    """An nn.Linear holding ``x @ weight_in_out + bias`` (nn.Linear stores the transpose)."""
    lin = nn.Linear(weight_in_out.shape[0], weight_in_out.shape[1])
    with torch.no_grad():
        lin.weight.copy_(weight_in_out.T)
        lin.bias.copy_(bias)
    return lin


class NaiveMMoE(nn.Module):
    """The straightforward MMoE graph, with weights copied from a fused ``MMoE``.

    User/context inputs are tiled to N rows before embedding; each expert is its own
    ``nn.Sequential`` of Linear+ReLU on the concatenated input x = [u, v] (N x d); each task has
    its own gate Linear(d, E) and tower. This is the benchmark baseline for the fused graph.
    """

    def __init__(self, fused: MMoE) -> None:
        super().__init__()
        if not isinstance(fused, MMoE):
            raise ValueError("the naive variant is defined for the MMoE architecture only")
        cfg = fused.config
        n_exp, n_tasks = cfg.n_experts, len(cfg.tasks)
        self.temperature = cfg.gate_temperature
        self.embedding = copy.deepcopy(fused.embedding)
        self.interactions = copy.deepcopy(fused.interactions)
        self.item_input = self.embedding.input_names("item")[0]
        ex = fused.experts
        experts = []
        for e in range(n_exp):
            w_first = torch.cat([ex.w_user[e], ex.w_item[e]], 0).detach()  # d x H1
            layers: list[nn.Module] = [_linear(w_first, ex.bias[e, 0].detach()), nn.ReLU()]
            for layer in batched(ex.rest):
                layers += [_linear(layer.weight[e].detach(), layer.bias[e, 0].detach())]
                layers.append(nn.ReLU())
            experts.append(nn.Sequential(*layers))
        self.experts = nn.ModuleList(experts)
        gate = fused.gates.logits
        w_gate = torch.cat([gate.w_user, gate.w_item], 0).detach()  # d x T*E
        self.gates = nn.ModuleList(
            _linear(w_gate[:, t * n_exp : (t + 1) * n_exp], gate.bias[t * n_exp : (t + 1) * n_exp])
            for t in range(n_tasks)
        )
        self.towers = nn.ModuleList(self._tower(fused, t) for t in range(n_tasks))
        self.heads = copy.deepcopy(fused.heads)

    @staticmethod
    def _tower(fused: MMoE, t: int) -> nn.Sequential:
        layers: list[nn.Module] = []
        for j, layer in enumerate(fused.towers.batched_layers()):
            if j:
                layers.append(nn.ReLU())
            layers.append(_linear(layer.weight[t].detach(), layer.bias[t, 0].detach()))
        return nn.Sequential(*layers)

    def forward(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """Encoded inputs (user/context batch 1 or N) -> {task: N, task_logit: N}."""
        n = inputs[self.item_input].shape[0]
        tiled = {
            k: x.expand(n, *x.shape[1:]) if k.startswith(("user_", "context_")) else x
            for k, x in inputs.items()
        }
        u, v = self.embedding(tiled)
        dots, terms = self.interactions(tiled) if self.interactions is not None else (None, None)
        x = torch.cat([u, v] if dots is None else [u, v, dots], 1)  # N x d
        experts = torch.stack([expert(x) for expert in self.experts], 1)  # N x E x H
        logits = []
        for gate, tower in zip(self.gates, self.towers, strict=True):
            weights = torch.softmax(gate(x) / self.temperature, dim=-1)  # N x E
            mixed = (weights.unsqueeze(-1) * experts).sum(1)  # N x H
            logits.append(tower(mixed).squeeze(-1))
        out: dict[str, Tensor] = self.heads(add_task_terms(torch.stack(logits, 0), terms))
        return out


def _frozen(t: Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().clone().contiguous(), requires_grad=False)


class ServingMMoE(nn.Module):
    """The published MMoE graph: the trained weights, laid out for onnxruntime on CPU.

    Against the trained module's own layout (batched 3-D matmuls over experts and a T x E x N x H
    broadcast mixture) this measured 1.1-1.2x faster in fp32 and 1.15-1.4x in int8 (100-1000
    candidates, one thread, default config; benchmarks/), with outputs equal within float error:

    - the user/context part of every first layer, experts and gates alike, is one row
      ``u @ W_u + b`` computed once per request; each expert's item-side layer takes its slice as
      the ``C`` input of an ONNX ``Gemm``, which broadcasts it over the N candidates;
    - every expert layer is a 2-D ``Gemm`` + ReLU, which onnxruntime fuses into one ``FusedGemm``
      (bias and activation applied in the GEMM's epilogue, no extra pass over N x H). A batched
      3-D MatMul gets no such fusion: its bias add and ReLU are separate passes over E x N x H;
    - the gate mixture is one batched matmul, gates N x T x E @ experts N x E x H;
    - towers are chains of 2-D ``Gemm`` + ReLU per task.

    int8 dynamic quantisation (:func:`quantize_int8`) converts every expert and tower GEMM here.
    """

    def __init__(self, fused: MMoE) -> None:
        super().__init__()
        if not isinstance(fused, MMoE):
            raise ValueError("the serving layout is defined for the MMoE architecture only")
        ex, gate = fused.experts, fused.gates.logits
        self.n_experts, self.n_tasks = fused.config.n_experts, len(fused.config.tasks)
        self.h1 = int(ex.w_item.shape[2])
        self.temperature = fused.config.gate_temperature
        self.embedding = copy.deepcopy(fused.embedding)
        self.interactions = copy.deepcopy(fused.interactions)  # request form: user side once
        # [W_u of expert 0 | ... | expert E-1 | gates]: D_u x (E*H1 + T*E), one matmul per request
        self.w_user = _frozen(torch.cat([ex.w_user.permute(1, 0, 2).flatten(1), gate.w_user], 1))
        self.b_user = _frozen(torch.cat([ex.bias.flatten(), gate.bias]))
        self.w_item = nn.ParameterList(_frozen(ex.w_item[e]) for e in range(self.n_experts))
        self.rest = nn.ModuleList(
            nn.ModuleList(
                _linear(layer.weight[e].detach(), layer.bias[e, 0].detach())
                for layer in batched(ex.rest)
            )
            for e in range(self.n_experts)
        )
        self.w_gate_item = _frozen(gate.w_item)
        self.towers = nn.ModuleList(NaiveMMoE._tower(fused, t) for t in range(self.n_tasks))
        self.heads = copy.deepcopy(fused.heads)

    def forward(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """Encoded inputs (user/context batch 1) -> {task: N, task_logit: N}."""
        u, v = self.embedding(inputs)  # 1 x D_u, N x D_i
        dots, terms = self.interactions(inputs) if self.interactions is not None else (None, None)
        if dots is not None:
            v = torch.cat([v, dots], 1)  # N x D_i': the dots join the item side
        user = u @ self.w_user + self.b_user  # 1 x (E*H1 + T*E): the user side, once
        experts = []
        for e, w_item in enumerate(self.w_item):
            h = torch.relu(torch.addmm(user[:, e * self.h1 : (e + 1) * self.h1], v, w_item))
            for layer in self.rest[e].children():
                h = torch.relu(layer(h))
            experts.append(h)  # N x H
        gate_user = user[:, self.n_experts * self.h1 :]
        logits = torch.addmm(gate_user, v, self.w_gate_item) / self.temperature  # N x T*E
        gates = torch.softmax(logits.reshape(-1, self.n_tasks, self.n_experts), -1)  # N x T x E
        mixed = torch.matmul(gates, torch.stack(experts, 1))  # N x T x H
        towers = [tower(mixed[:, t]).squeeze(-1) for t, tower in enumerate(self.towers)]
        out: dict[str, Tensor] = self.heads(add_task_terms(torch.stack(towers, 0), terms))
        return out


def serving_module(model: RankingModel, variant: Variant) -> nn.Module:
    """The module traced for ``variant``: fused (the published layout), naive or trained."""
    if variant == "naive":
        return NaiveMMoE(model)  # type: ignore[arg-type]
    if variant == "fused" and isinstance(model, MMoE):
        return ServingMMoE(model)
    return model


# -- random valid requests ---------------------------------------------------------------------


def _random_column(schema: FeatureSchema, name: str, n: int, rng: np.random.Generator) -> list:
    f = schema.by_name(name)
    if f.kind == "categorical":
        return [int(x) for x in rng.integers(0, 10 * f.buckets, n)]
    if f.kind == "multi_categorical":
        lengths = rng.integers(0, f.max_len + 2, n)  # empty lists and truncation included
        return [",".join(str(t) for t in rng.integers(0, 10 * f.buckets, k)) for k in lengths]
    return [float(x) for x in rng.lognormal(2.0, 1.5, n)]


def random_request(
    schema: FeatureSchema, n: int, rng: np.random.Generator
) -> tuple[dict[str, Any], dict[str, Any], dict[str, list]]:
    """Raw (user, context, item columns) for one request of ``n`` candidates."""
    user = {name: _random_column(schema, name, 1, rng)[0] for name in schema.names("user")}
    context = {name: _random_column(schema, name, 1, rng)[0] for name in schema.names("context")}
    items = {name: _random_column(schema, name, n, rng) for name in schema.names("item")}
    return user, context, items


def random_encoded(
    schema: FeatureSchema, n: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """A random request encoded through the schema, as the service would encode it."""
    user, context, items = random_request(schema, n, rng)
    return schema.encode(user, context, items, n)


# -- running -----------------------------------------------------------------------------------


def run_session(session: ort.InferenceSession, encoded: Mapping[str, np.ndarray]) -> dict:
    """{output name: array} for one encoded request."""
    feed = {i.name: encoded[i.name] for i in session.get_inputs()}
    values = session.run(list(OUTPUTS), feed)
    return dict(zip(OUTPUTS, values, strict=True))


def torch_predict(model: nn.Module, encoded: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Eval-mode torch predictions {task: N} for encoded arrays (any batch layout)."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            out = model({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in encoded.items()})
    finally:
        model.train(was_training)
    return {t: out[t].numpy() for t in OUTPUTS}


# -- export ------------------------------------------------------------------------------------


def export_onnx(
    model: RankingModel,
    schema: FeatureSchema,
    path: Path | str,
    opset: int = DEFAULT_OPSET,
    variant: Variant = "fused",
) -> None:
    """Export ``model`` as a request-shaped ONNX graph at ``path``, then check it.

    Checks: ``onnx.checker``; the session's inputs equal ``schema.input_specs()`` (names, dtypes,
    batch 1 for user/context, "N" for items); outputs are click/watch_time/like [N]; and a
    random request scores the same in onnxruntime as in torch (within 1e-4).
    """
    if set(OUTPUTS) - set(model.config.tasks):
        raise ValueError(f"the serving graph needs the tasks {OUTPUTS}")
    specs = schema.input_specs()
    names = [s["name"] for s in specs]
    graph = ServingGraph(serving_module(model, variant), names)
    # N = 3 for tracing: neither 1 (would hide a missing broadcast) nor a user-side batch size.
    example = random_encoded(schema, 3, np.random.default_rng(0))
    args = tuple(torch.from_numpy(example[n]) for n in names)
    dynamic = {s["name"]: {0: "N"} for s in specs if s["shape"][0] == "N"}
    dynamic.update({name: {0: "N"} for name in OUTPUTS})
    was_training = model.training
    model.eval()
    graph.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # The legacy exporter is chosen on purpose (module docstring); its notice is noise.
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            # Branches on the user side's batch (Interactions) are constants here on purpose: the
            # request graph's user/context inputs have batch 1 by contract (the input specs).
            warnings.filterwarnings(
                "ignore", category=torch.jit.TracerWarning, message="Converting a tensor"
            )
            torch.onnx.export(
                graph,
                args,
                str(path),
                input_names=names,
                output_names=list(OUTPUTS),
                dynamic_axes=dynamic,
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
    finally:
        model.train(was_training)
    onnx.checker.check_model(str(path))
    _check_session(make_session(path), specs, model, example)


def _check_session(
    session: ort.InferenceSession,
    specs: list[dict[str, Any]],
    model: nn.Module,
    example: dict[str, np.ndarray],
) -> None:
    got = [
        {"name": i.name, "dtype": normalise_dtype(i.type), "shape": i.shape}
        for i in session.get_inputs()
    ]
    if got != specs:
        raise RuntimeError(f"exported inputs {got} differ from the schema's {specs}")
    outputs = [(o.name, o.type, o.shape) for o in session.get_outputs()]
    if outputs != [(name, "tensor(float)", ["N"]) for name in OUTPUTS]:
        raise RuntimeError(f"exported outputs {outputs} are not click/watch_time/like float [N]")
    diff = compare(torch_predict(model, example), run_session(session, example))
    if max(diff.values()) > 1e-4:
        raise RuntimeError(f"onnxruntime disagrees with torch on a smoke request: {diff}")


def compare(
    reference: Mapping[str, np.ndarray], other: Mapping[str, np.ndarray]
) -> dict[str, float]:
    """Max abs diff over probability outputs and max relative diff over watch time."""
    prob = max(float(np.max(np.abs(reference[t] - other[t]), initial=0.0)) for t in PROB_OUTPUTS)
    ref_w = reference["watch_time"].astype(np.float64)
    rel = np.abs(ref_w - other["watch_time"]) / np.maximum(np.abs(ref_w), 1e-12)
    return {"max_abs_prob": prob, "max_rel_watch": float(np.max(rel, initial=0.0))}


def parity(
    model: nn.Module,
    schema: FeatureSchema,
    onnx_path: Path | str,
    n_values: Sequence[int] = (1, 7, 1000),
    seed: int = 0,
) -> dict[str, Any]:
    """Torch vs onnxruntime on random valid requests of each size in ``n_values``.

    Returns ``{"max_abs_prob", "max_rel_watch", "per_n": {str(n): {...}}}``.
    """
    session = make_session(onnx_path)
    rng = np.random.default_rng(seed)
    per_n: dict[str, dict[str, float]] = {}
    for n in n_values:
        encoded = random_encoded(schema, n, rng)
        per_n[str(n)] = compare(torch_predict(model, encoded), run_session(session, encoded))
    return {
        "max_abs_prob": max(d["max_abs_prob"] for d in per_n.values()),
        "max_rel_watch": max(d["max_rel_watch"] for d in per_n.values()),
        "per_n": per_n,
    }


# -- int8 and held-out scoring -----------------------------------------------------------------


def quantize_int8(src: Path | str, dest: Path | str) -> Path:
    """int8 dynamic quantisation of an exported graph (``vidrank train --quantize``).

    onnxruntime's ``quantize_dynamic``: MatMul/Gemm weights and embedding tables are stored as
    int8 (one scale per tensor), activations are quantised per call. In the fused layout every
    expert and tower GEMM is converted (onnxruntime runs them as DynamicQuantizeMatMul /
    MatMulIntegerToFloat, with VNNI where the CPU has it); the gate mixture, a matmul of two
    activations, stays float. The file shrinks about 4x.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its "consider pre-processing" notice: shapes add nothing here
    try:
        # reduce_range: 7-bit weights. Without VNNI (AVX2 only), onnxruntime's u8s8 kernels add
        # pairs of products in saturating int16 (vpmaddubsw); with full-range weights that
        # overflowed and cost 0.036 held-out click AUC on an AVX2 machine (0.0000 with it).
        quantize_dynamic(str(src), str(dest), weight_type=QuantType.QInt8, reduce_range=True)
    finally:
        root.setLevel(level)
    return Path(dest)


@dataclass
class FrameRequests:
    """An impression frame encoded once and cut into requests as the service would get them.

    Rows that share every user and context feature form one request (user side batch 1, the
    rows as candidates). Scoring several graphs on the same requests encodes the frame once.
    """

    n_rows: int
    encoded: dict[str, np.ndarray]
    groups: list[np.ndarray]  # the frame rows of each request

    @classmethod
    def of(cls, schema: FeatureSchema, frame: pd.DataFrame) -> FrameRequests:
        columns = {n: frame[n].to_numpy() for n in schema.names() if n in frame.columns}
        encoded = schema.encode_rows(columns, len(frame))
        keys = [n for n in (*schema.names("user"), *schema.names("context")) if n in frame]
        groups = (
            frame.groupby(keys, sort=False, dropna=False).indices
            if keys
            else {(): np.arange(len(frame))}
        )
        return cls(len(frame), encoded, list(groups.values()))

    def predict(self, onnx_path: Path | str) -> dict[str, np.ndarray]:
        """The graph's predictions {task: [rows]} for every row, request by request."""
        session = make_session(onnx_path, intra_op_threads=1)
        out = {t: np.empty(self.n_rows, dtype=np.float32) for t in OUTPUTS}
        for rows in self.groups:
            feed = {
                k: v[rows] if k.startswith("item_") else v[rows[:1]]
                for k, v in self.encoded.items()
            }
            for task, values in run_session(session, feed).items():
                out[task][rows] = values
        return out


def predict_frame(
    onnx_path: Path | str, schema: FeatureSchema, frame: pd.DataFrame
) -> dict[str, np.ndarray]:
    """The graph's predictions {task: [rows]} for every row of an impression frame.

    Rows are scored as the service scores them (see :class:`FrameRequests`).
    """
    return FrameRequests.of(schema, frame).predict(onnx_path)
