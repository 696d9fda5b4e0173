"""One loaded model version: its bundle, its onnxruntime session and what requests need from it.

A :class:`Scorer` is built by the reconciler, never on the request path: creating the session,
checking it against the manifest and warming it up all happen before the scorer is swapped in.
After that it is read-only, so any number of request threads may call :meth:`Scorer.score` at
once (``InferenceSession.run`` is thread-safe).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping

import numpy as np

from model.core.bundle import Bundle, BundleError, validate_against_session_io
from model.core.fusion import FusionError, FusionSpec
from model.core.runtime import make_session
from model.core.tasks import TASKS
from service.scoring.heap import release_heap
from service.scoring.request import SchemaView

WARMUP_SIZES: tuple[int, ...] = (1, 100, 500)  # plus the largest request, capped at WARMUP_MAX
WARMUP_MAX = 2000


class Scorer:
    """A verified, warmed model version ready to score requests."""

    def __init__(self, bundle: Bundle, intra_op_threads: int) -> None:
        """Create the session and check it against the manifest; raises ``BundleError``."""
        self.bundle = bundle
        self.version = bundle.version
        self.threads = intra_op_threads
        self.schema = bundle.schema
        self.view = SchemaView.of(self.schema)
        # Two versions with the same schema encode a request identically: a shadow reuses the
        # served version's inputs instead of encoding them again.
        self.schema_key = hashlib.blake2b(
            json.dumps(bundle.manifest["feature_schema"], sort_keys=True).encode(), digest_size=16
        ).digest()
        self.reference = bundle.reference  # held-out predictions' distribution, or None
        try:
            self.default_fusion = FusionSpec.from_dict(bundle.default_fusion, "default_fusion")
        except FusionError as e:
            raise BundleError(f"invalid default fusion in the manifest: {e}") from e
        try:
            self.session = make_session(bundle.onnx_path, intra_op_threads)
        except Exception as e:  # onnxruntime raises its own types for corrupt graphs
            # onnxruntime's message names the file by its absolute path: keep the registry's
            # location out of what an admin client (and /models) is told.
            reason = str(e).replace(str(bundle.path), bundle.path.name)
            raise BundleError(f"onnxruntime cannot load {bundle.onnx_path.name}: {reason}") from e
        validate_against_session_io(
            bundle,
            [(i.name, i.type, i.shape) for i in self.session.get_inputs()],
            [(o.name, o.type, o.shape) for o in self.session.get_outputs()],
        )
        self.output_names = list(TASKS)
        self.input_names = frozenset(i.name for i in self.session.get_inputs())

    def __del__(self) -> None:
        # The last reference to a swapped-out scorer goes when its last in-flight request ends
        # (or at the swap itself): free the session now, then return its pages (~ms, once).
        session = self.__dict__.pop("session", None)
        if session is not None:
            del session
            release_heap()

    def score(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the graph on encoded inputs; returns {task: float32 [N]}."""
        outs = self.session.run(self.output_names, {k: inputs[k] for k in self.input_names})
        return dict(zip(self.output_names, outs, strict=True))

    def warm_up(self, sizes: tuple[int, ...] = WARMUP_SIZES) -> float:
        """Score synthetic requests built from the schema defaults; return the seconds taken.

        This runs the graph once per size so that onnxruntime's allocations and kernel choices
        happen here rather than in the first real requests (TF Serving #881), and it proves the
        graph actually executes and yields finite predictions of the right shape.
        """
        start = time.perf_counter()
        for n in sizes:
            ids = np.arange(n, dtype=np.int64)
            inputs = self.schema.encode({}, {}, {"video_id": ids}, n)
            try:
                preds = self.score(inputs)
            except Exception as e:
                raise BundleError(f"warm-up inference failed for {n} candidates: {e}") from e
            for task in self.output_names:
                p = np.asarray(preds[task])
                if p.shape != (n,):
                    raise BundleError(f"warm-up: output {task} has shape {p.shape}, not ({n},)")
                if not np.isfinite(p).all():
                    raise BundleError(f"warm-up: output {task} has non-finite predictions")
        return time.perf_counter() - start
