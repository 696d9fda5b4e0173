"""Self-describing model bundles: ``model.onnx`` + ``manifest.json`` (numpy + stdlib only).

A bundle is a directory holding the exported ONNX graph and a manifest that says everything the
service needs to serve it without any model-specific code: the feature schema (so requests are
encoded exactly as the trainer encoded its data), the ONNX inputs/outputs, the task heads, the
default fusion, and the sha256 of ``model.onnx``.

Loading verifies the bundle *before* anything is served: a half-copied or corrupted model must be
rejected at load time with a readable reason (the service answers HTTP 409 with it and keeps the
old model serving), never discovered at inference time (TF Serving #1086).

This module is on the serving path: it must not import torch, onnx or onnxruntime.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from model.core.distribution import MANIFEST_KEY as DISTRIBUTION_KEY
from model.core.distribution import DistributionError, Reference
from model.core.errors import VidrankError
from model.core.features import FeatureError, FeatureSchema
from model.core.fileio import (
    file_chunks,
    fsync_dir,
    fsync_file,
    json_bytes,
    sha256_file,
    utc_now_iso,
    write_atomic,
)
from model.core.tasks import TASK_KINDS, TASK_SPECS, TASKS

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "MODEL_FILE",
    "VERSION_RE",
    "Bundle",
    "BundleError",
    "build_manifest",
    "load_bundle",
    "normalise_dtype",
    "validate_against_session_io",
    "write_bundle",
]

MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS: frozenset[int] = frozenset({1})
_TASK_KEYS: tuple[str, ...] = ("name", "kind", "unit")

# The registry's version-name pattern. It lives here (re-exported by model.core.registry)
# because the bundle checks it too and the registry imports this module, not the reverse.
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_INPUT_DTYPES: frozenset[str] = frozenset({"int64", "float32"})

# Keys every manifest must carry, with their JSON types. bool is rejected for int fields below.
_REQUIRED_KEYS: dict[str, tuple[type, ...]] = {
    "format_version": (int,),
    "version": (str,),
    "created_at": (str,),
    "feature_schema": (dict,),
    "inputs": (list,),
    "outputs": (list,),
    "tasks": (list,),
    "default_fusion": (dict,),
    "sha256": (str,),
    "size_bytes": (int,),
}
# Descriptive metadata: type-checked when present, but serving does not depend on it, so a
# bundle from another exporter that omits it still loads.
_OPTIONAL_KEYS: dict[str, tuple[type, ...]] = {
    "mmoe_config": (dict,),
    "metrics": (dict,),
    "opset": (int,),
    "versions": (dict,),
    "gate_diagnostics": (dict, type(None)),
    "prediction_distribution": (dict,),  # model.core.distribution: held-out predictions
}


class BundleError(VidrankError):
    """A bundle that cannot be served; ``message`` (also ``reason``) says why.

    The service turns it into HTTP 409 with the message.
    """

    code = "invalid_bundle"

    @property
    def reason(self) -> str:
        """The message, under the name the CLI and the reconciler log it by."""
        return self.message


@dataclass(frozen=True)
class Bundle:
    """A loaded (and, by default, verified) bundle directory and its parsed manifest."""

    path: Path
    manifest: dict[str, Any]

    @property
    def version(self) -> str:
        """The version name recorded in the manifest."""
        return str(self.manifest["version"])

    @cached_property
    def schema(self) -> FeatureSchema:
        """The feature schema the model was trained with, rebuilt from the manifest."""
        return FeatureSchema.from_dict(self.manifest["feature_schema"])

    @property
    def onnx_path(self) -> Path:
        """Path of the ONNX graph inside the bundle."""
        return self.path / MODEL_FILE

    @property
    def manifest_path(self) -> Path:
        """Path of the manifest inside the bundle."""
        return self.path / MANIFEST_FILE

    @property
    def inputs(self) -> list[dict[str, Any]]:
        """ONNX inputs: ``[{"name", "dtype", "shape"}]`` as in ``FeatureSchema.input_specs()``."""
        return list(self.manifest["inputs"])

    @property
    def outputs(self) -> list[dict[str, Any]]:
        """ONNX outputs: ``[{"name", "dtype": "float32", "shape": ["N"]}]``, one per task."""
        return list(self.manifest["outputs"])

    @property
    def tasks(self) -> list[dict[str, Any]]:
        """Task heads: ``[{"name", "kind", "unit"}]``."""
        return list(self.manifest["tasks"])

    @property
    def task_names(self) -> list[str]:
        """Names of the task heads, in manifest order."""
        return [str(t["name"]) for t in self.manifest["tasks"]]

    @property
    def default_fusion(self) -> dict[str, Any]:
        """The fusion the trainer recommends; the service's fallback profile."""
        return dict(self.manifest["default_fusion"])

    @property
    def metrics(self) -> dict[str, Any]:
        """Offline evaluation metrics (AUCs etc.); empty when the manifest has none."""
        return dict(self.manifest.get("metrics") or {})

    @cached_property
    def reference(self) -> Reference | None:
        """Held-out prediction distribution per task (drift reference); None in older bundles."""
        return Reference.from_manifest(self.manifest)

    @property
    def size_bytes(self) -> int:
        """Size of ``model.onnx`` in bytes, as recorded (and verified) in the manifest."""
        return int(self.manifest["size_bytes"])

    @property
    def sha256(self) -> str:
        """sha256 of ``model.onnx`` (hex), as recorded in the manifest."""
        return str(self.manifest["sha256"])


# -- hashing / JSON ----------------------------------------------------------------------------


def _jsonable(obj: Any, where: str = "manifest") -> Any:
    """Convert ``obj`` into plain JSON types.

    numpy scalars/arrays (duck-typed through ``tolist`` so numpy need not be imported) become
    Python numbers/lists; tuples become lists; non-finite floats become ``null`` because JSON has
    no NaN and strict parsers (and the HTTP API) would reject the manifest otherwise.
    """
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, Path):
        return str(obj)
    tolist = getattr(obj, "tolist", None)
    if callable(tolist):
        return _jsonable(tolist(), where)
    raise BundleError(f"{where}: value of type {type(obj).__name__} is not JSON-serialisable")


# -- building ----------------------------------------------------------------------------------


def _task_spec(task: str | Mapping[str, Any]) -> dict[str, str]:
    """A task given by name takes its default description; a mapping is validated as is."""
    if isinstance(task, str):
        if task not in TASK_SPECS:
            raise BundleError(f"unknown task {task!r}: describe it as {{name, kind, unit}}")
        return dict(TASK_SPECS[task])
    spec = {k: task.get(k) for k in _TASK_KEYS}
    if not all(isinstance(v, str) and v for v in spec.values()):
        raise BundleError(f"task {dict(task)!r} needs string name, kind and unit")
    if spec["kind"] not in TASK_KINDS:
        raise BundleError(f"task {spec['name']}: kind must be one of {TASK_KINDS}")
    return {k: str(v) for k, v in spec.items()}


def build_manifest(
    *,
    version: str,
    schema: FeatureSchema,
    onnx_path: Path,
    tasks: Sequence[str | Mapping[str, Any]] = TASKS,
    mmoe_config: Mapping[str, Any],
    metrics: Mapping[str, Any],
    default_fusion: Mapping[str, Any],
    opset: int,
    versions: Mapping[str, str],
    gate_diagnostics: Mapping[str, Any] | None = None,
    prediction_distribution: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Build a manifest for the ONNX graph at ``onnx_path``.

    ``tasks`` are task names (described by ``TASK_SPECS``) or ``{name, kind, unit}`` mappings;
    one float32 ``[N]`` output is declared per task. ``versions`` records library versions
    (onnxruntime, torch, onnx, vidrank). ``prediction_distribution`` is the held-out predictions'
    histogram (``model.core.distribution.reference_section``), the service's drift reference.
    ``extra`` keys are merged into the top level and may not
    shadow a standard key. The sha256/size are taken from ``onnx_path``; ``write_bundle``
    recomputes them from the bytes it actually writes.
    """
    if not VERSION_RE.fullmatch(version):
        raise BundleError(f"invalid version name {version!r}: must match {VERSION_RE.pattern}")
    task_specs = [_task_spec(t) for t in tasks]
    onnx_path = Path(onnx_path)
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "version": version,
        "created_at": utc_now_iso(),
        "feature_schema": schema.to_dict(),
        "inputs": schema.input_specs(),
        "outputs": [{"name": t["name"], "dtype": "float32", "shape": ["N"]} for t in task_specs],
        "tasks": task_specs,
        "mmoe_config": dict(mmoe_config),
        "metrics": dict(metrics),
        "default_fusion": dict(default_fusion),
        "opset": int(opset),
        "versions": {str(k): str(v) for k, v in versions.items()},
        "gate_diagnostics": dict(gate_diagnostics) if gate_diagnostics is not None else None,
        "sha256": sha256_file(onnx_path),
        "size_bytes": onnx_path.stat().st_size,
    }
    if prediction_distribution is not None:
        manifest[DISTRIBUTION_KEY] = dict(prediction_distribution)
    for key, value in (extra or {}).items():
        if key in manifest:
            raise BundleError(f"extra manifest key {key!r} would shadow a standard key")
        manifest[key] = value
    result: dict[str, Any] = _jsonable(manifest)
    return result


# -- writing -----------------------------------------------------------------------------------


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def write_bundle(dest_dir: Path, onnx_src: Path | bytes, manifest: Mapping[str, Any]) -> Bundle:
    """Write ``model.onnx`` and ``manifest.json`` into ``dest_dir`` and return the loaded bundle.

    ``onnx_src`` is the graph's path or its bytes. The manifest's ``sha256``/``size_bytes`` are
    (re)computed from the bytes actually written. Each file is written to a temp file, fsynced and
    renamed, then the directory is fsynced. The result is loaded with full verification, so an
    inconsistent manifest fails here, at training time, rather than at deployment.
    """
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    model_dest = dest_dir / MODEL_FILE
    if isinstance(onnx_src, bytes | bytearray | memoryview):
        data = bytes(onnx_src)
        digest, size = write_atomic(model_dest, [data]), len(data)
    elif _same_file(Path(onnx_src), model_dest):
        # The exporter wrote straight into the bundle directory: nothing to copy.
        fsync_file(model_dest)
        digest, size = sha256_file(model_dest), model_dest.stat().st_size
    else:
        digest = write_atomic(model_dest, file_chunks(Path(onnx_src)))
        size = model_dest.stat().st_size
    final = dict(manifest)
    final["sha256"], final["size_bytes"] = digest, size
    write_atomic(dest_dir / MANIFEST_FILE, [json_bytes(_jsonable(final))])
    fsync_dir(dest_dir)
    return load_bundle(dest_dir, verify=True)


# -- loading / validation ----------------------------------------------------------------------


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise BundleError(f"cannot read {MANIFEST_FILE}: {e.strerror or e}") from e
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise BundleError(f"{MANIFEST_FILE} is not valid UTF-8: {e}") from e
    except json.JSONDecodeError as e:
        raise BundleError(f"{MANIFEST_FILE} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise BundleError(f"{MANIFEST_FILE} must hold a JSON object, not {type(data).__name__}")
    return data


def _type_ok(value: Any, types: tuple[type, ...]) -> bool:
    # bool is an int subclass, but `"size_bytes": true` is a broken manifest.
    if isinstance(value, bool) and bool not in types:
        return False
    return isinstance(value, types)


def _type_names(types: tuple[type, ...]) -> str:
    names = {dict: "object", list: "array", str: "string", int: "integer", type(None): "null"}
    return " or ".join(names.get(t, t.__name__) for t in types)


def _check_keys(m: Mapping[str, Any]) -> None:
    missing = [k for k in _REQUIRED_KEYS if k not in m]
    if missing:
        raise BundleError(f"manifest is missing required key(s): {', '.join(missing)}")
    for key, types in (_REQUIRED_KEYS | _OPTIONAL_KEYS).items():
        if key in m and not _type_ok(m[key], types):
            raise BundleError(
                f"manifest key {key!r} must be {_type_names(types)}, not {type(m[key]).__name__}"
            )


def _check_header(m: Mapping[str, Any]) -> None:
    if m["format_version"] not in SUPPORTED_FORMAT_VERSIONS:
        raise BundleError(
            f"unsupported format_version {m['format_version']} "
            f"(supported: {sorted(SUPPORTED_FORMAT_VERSIONS)})"
        )
    if not VERSION_RE.fullmatch(m["version"]):
        raise BundleError(f"invalid version name {m['version']!r}: must match {VERSION_RE.pattern}")
    if not _SHA256_RE.fullmatch(m["sha256"]):
        raise BundleError("manifest sha256 must be 64 lowercase hex digits")


def _check_model_file(path: Path, m: Mapping[str, Any], verify: bool) -> None:
    model = path / MODEL_FILE
    if verify:
        actual = sha256_file(model)
        if actual != m["sha256"]:
            raise BundleError(
                f"checksum mismatch: manifest says {m['sha256']}, {MODEL_FILE} has {actual}"
            )
    size = model.stat().st_size
    if size != m["size_bytes"]:
        # Without verification this still catches a truncated (half-copied) graph cheaply.
        raise BundleError(
            f"size mismatch: manifest says {m['size_bytes']} bytes, {MODEL_FILE} has {size}"
        )


def _parse_schema(m: Mapping[str, Any]) -> FeatureSchema:
    try:
        return FeatureSchema.from_dict(m["feature_schema"])
    except (FeatureError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise BundleError(f"invalid feature schema: {e}") from e


def _canonical(obj: Any) -> Any:
    """JSON round-trip so tuples/lists and numpy ints compare equal to what a manifest holds."""
    return json.loads(json.dumps(_jsonable(obj)))


def _io_entries(entries: list[Any], what: str) -> dict[str, dict[str, Any]]:
    """Validate ``[{name, dtype, shape}]`` and index it by name."""
    by_name: dict[str, dict[str, Any]] = {}
    for i, e in enumerate(entries):
        if not (
            isinstance(e, dict)
            and isinstance(e.get("name"), str)
            and isinstance(e.get("dtype"), str)
            and isinstance(e.get("shape"), list)
        ):
            raise BundleError(f"manifest {what}[{i}] must be an object with name, dtype, shape")
        if e["name"] in by_name:
            raise BundleError(f"manifest {what} list {e['name']!r} twice")
        by_name[e["name"]] = e
    return by_name


def _check_inputs(m: Mapping[str, Any], schema: FeatureSchema) -> None:
    declared = _io_entries(m["inputs"], "inputs")
    expected = {s["name"]: s for s in _canonical(schema.input_specs())}
    problems: list[str] = []
    missing = sorted(expected.keys() - declared.keys())
    extra = sorted(declared.keys() - expected.keys())
    if missing:
        problems.append(f"inputs missing from manifest: {missing}")
    if extra:
        problems.append(f"inputs the feature schema does not produce: {extra}")
    for name in sorted(expected.keys() & declared.keys()):
        want, got = expected[name], declared[name]
        if (got["dtype"], got["shape"]) != (want["dtype"], want["shape"]):
            problems.append(
                f"{name} is {got['dtype']}{got['shape']} in the manifest but the schema encodes "
                f"{want['dtype']}{want['shape']}"
            )
    if problems:
        raise BundleError("incompatible schema: " + "; ".join(problems))


def _check_outputs_and_tasks(m: Mapping[str, Any]) -> None:
    outputs = _io_entries(m["outputs"], "outputs")
    missing = [t for t in TASKS if t not in outputs]
    if missing:
        raise BundleError(f"manifest outputs lack required task head(s): {', '.join(missing)}")
    for name in TASKS:
        if outputs[name]["dtype"] != "float32":
            raise BundleError(f"output {name} must be float32, not {outputs[name]['dtype']}")
    for i, t in enumerate(m["tasks"]):
        if not (isinstance(t, dict) and all(isinstance(t.get(k), str) for k in _TASK_KEYS)):
            raise BundleError(f"manifest tasks[{i}] must be an object with name, kind, unit")
        if t["kind"] not in TASK_KINDS:
            raise BundleError(f"task {t['name']}: kind must be one of {TASK_KINDS}")
        if t["name"] not in outputs:
            raise BundleError(f"task {t['name']} has no ONNX output of that name")
    named = {t["name"] for t in m["tasks"]}
    if missing_tasks := [t for t in TASKS if t not in named]:
        raise BundleError(f"manifest tasks lack required head(s): {', '.join(missing_tasks)}")


def _check_reference(m: Mapping[str, Any]) -> None:
    try:
        reference = Reference.from_manifest(m)
    except DistributionError as e:
        raise BundleError(f"invalid {e}") from e
    if reference is not None and (unknown := sorted(set(reference.counts) - set(TASKS))):
        raise BundleError(f"prediction_distribution names unknown task(s): {', '.join(unknown)}")


def load_bundle(path: Path, *, verify: bool = True) -> Bundle:
    """Load and validate a bundle directory; raise ``BundleError`` with a clear reason.

    Checks, in order: the directory and both files exist; the manifest is a JSON object with the
    required keys and types; the format version is supported; the version name is valid; the
    sha256 of ``model.onnx`` matches (skipped when ``verify`` is false, though the size is still
    compared); the feature schema parses; the declared inputs are exactly what the schema encodes;
    the outputs and task heads include click, watch_time and like; the optional
    ``prediction_distribution`` is well formed.
    """
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"bundle directory not found: {path.name}")
    for name in (MODEL_FILE, MANIFEST_FILE):
        if not (path / name).is_file():
            raise BundleError(f"bundle {path.name} has no {name}")
    manifest = _read_manifest(path / MANIFEST_FILE)
    _check_keys(manifest)
    _check_header(manifest)
    try:
        _check_model_file(path, manifest, verify)
    except OSError as e:
        raise BundleError(f"cannot read {MODEL_FILE}: {e.strerror or e}") from e
    schema = _parse_schema(manifest)
    _check_inputs(manifest, schema)
    _check_outputs_and_tasks(manifest)
    _check_reference(manifest)
    bundle = Bundle(path=path, manifest=manifest)
    # Seed the cached schema so it is parsed once per load, not on every access.
    bundle.__dict__["schema"] = schema
    return bundle


# -- checking a live session against the manifest ---------------------------------------------

_DTYPE_ALIASES = {"float": "float32", "double": "float64", "half": "float16"}


def normalise_dtype(dtype: str) -> str:
    """Map onnxruntime type strings such as ``tensor(int64)``/``tensor(float)`` to numpy names."""
    s = str(dtype).strip().lower()
    if s.startswith("tensor(") and s.endswith(")"):
        s = s[len("tensor(") : -1]
    return _DTYPE_ALIASES.get(s, s)


def _shape_problem(name: str, declared: list[Any], actual: Sequence[Any] | None) -> str | None:
    """Compare a manifest shape with a session's; symbolic/None dims in the graph are dynamic."""
    if actual is None:
        return None
    if len(actual) != len(declared):
        return f"{name} has rank {len(actual)} in the graph, {len(declared)} in the manifest"
    for axis, (want, got) in enumerate(zip(declared, actual, strict=True)):
        if not isinstance(got, int) or isinstance(got, bool):
            continue  # dynamic in the graph: accepts whatever the manifest promises
        if isinstance(want, str):
            return f"{name} axis {axis} is fixed to {got} in the graph but dynamic ({want}) here"
        if want != got:
            return f"{name} axis {axis} is {got} in the graph, {want} in the manifest"
    return None


def validate_against_session_io(
    bundle: Bundle,
    input_meta: Sequence[tuple[str, str, Sequence[Any] | None]],
    output_names: Sequence[str | tuple[str, str] | tuple[str, str, Sequence[Any] | None]],
) -> None:
    """Check a created inference session's I/O against the bundle's manifest.

    ``input_meta`` is ``[(name, dtype, shape)]`` as an onnxruntime session reports it (dtype like
    ``"tensor(int64)"``, shape dims int, str or None); ``output_names`` are output names, or
    ``(name, dtype[, shape])`` tuples to also check dtypes. The graph must take exactly the
    manifest's inputs with the same dtypes (and compatible shapes) and produce every manifest
    output; extra graph outputs are allowed since they need not be fetched. Raises ``BundleError``.
    This keeps the check free of onnxruntime so it can be unit-tested without a real graph.
    """
    problems: list[str] = []
    declared_in = {e["name"]: e for e in bundle.inputs}
    graph_in = {name: (normalise_dtype(dtype), shape) for name, dtype, shape in input_meta}
    if missing := sorted(declared_in.keys() - graph_in.keys()):
        problems.append(f"graph lacks inputs {missing}")
    if extra := sorted(graph_in.keys() - declared_in.keys()):
        problems.append(f"graph needs inputs the manifest does not declare: {extra}")
    for name in sorted(declared_in.keys() & graph_in.keys()):
        dtype, shape = graph_in[name]
        if dtype != declared_in[name]["dtype"]:
            problems.append(f"input {name} is {dtype} in the graph, {declared_in[name]['dtype']}")
        elif problem := _shape_problem(name, declared_in[name]["shape"], shape):
            problems.append(problem)
    graph_out: dict[str, str | None] = {}
    for out in output_names:
        if isinstance(out, str):
            graph_out[out] = None
        else:
            graph_out[out[0]] = normalise_dtype(out[1])
    for e in bundle.outputs:
        if e["name"] not in graph_out:
            problems.append(f"graph lacks output {e['name']}")
        elif graph_out[e["name"]] not in (None, e["dtype"]):
            problems.append(f"output {e['name']} is {graph_out[e['name']]}, not {e['dtype']}")
    if problems:
        raise BundleError(
            f"model.onnx does not match the manifest of {bundle.version}: " + "; ".join(problems)
        )
