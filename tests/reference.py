"""Stored reference values of numeric output, checked the way the project promises them.

"Same seed, same world" holds on any CPU in this sense (README, docs/internals.md):

- integer, boolean and string columns (ids, exposures, labels) are **identical**;
- float columns agree within ``FLOAT_RTOL`` / ``FLOAT_ATOL``.

numpy's transcendental functions (sin, exp, log, ...) round the last bit differently on its
baseline, AVX2 and AVX-512 kernels (measured: 2e-15 relative at most on the simulator), so a float
column's bytes are a property of the CPU, not of the code; a digest of them fails on another
machine while proving nothing more. Exact columns are stored as a sha256 of their values (a
portable little-endian int64 or text encoding: equal digests = equal values); float columns as
summary statistics plus a fixed sample of rows, compared within the tolerance.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

FLOAT_RTOL = 1e-9  # a million times the SIMD paths' spread, far below any modelling change
FLOAT_ATOL = 1e-12
SAMPLE_ROWS = 32


def exact_digest(values: np.ndarray) -> str:
    """sha256 of integer/boolean values as little-endian int64, or of text joined by US (0x1f)."""
    if values.dtype.kind in "biu":
        data = np.ascontiguousarray(values, dtype="<i8").tobytes()
    else:
        data = "\x1f".join(map(str, values)).encode()
    return hashlib.sha256(data).hexdigest()


def float_summary(values: np.ndarray) -> dict[str, Any]:
    """Mean, std, min, max and ``SAMPLE_ROWS`` evenly spaced values of a float column."""
    rows = np.linspace(0, len(values) - 1, min(SAMPLE_ROWS, len(values))).astype(int)
    stats = [values.mean(), values.std(), values.min(), values.max()] if len(values) else []
    return {"stats": [float(s) for s in stats], "sample": values[rows].astype(float).tolist()}


def column_reference(values: np.ndarray) -> dict[str, Any]:
    """What a column's reference stores: a digest when exact, a summary when float."""
    if values.dtype.kind == "f":
        return {"dtype": str(values.dtype), **float_summary(values)}
    return {"dtype": str(values.dtype), "sha256": exact_digest(values)}


def frames_reference(frames: Mapping[str, pd.DataFrame]) -> dict[str, Any]:
    """The reference of named frames: row counts and every column's reference, in order."""
    return {
        name: {
            "rows": len(frame),
            "columns": {str(c): column_reference(frame[c].to_numpy()) for c in frame.columns},
        }
        for name, frame in frames.items()
    }


def assert_matches_reference(actual: Mapping[str, Any], stored: Mapping[str, Any]) -> None:
    """Exact columns identical, float columns within tolerance; the message names the column."""
    assert list(actual) == list(stored), "frames differ"
    for name, frame in stored.items():
        got = actual[name]
        assert got["rows"] == frame["rows"], f"{name}: rows"
        assert list(got["columns"]) == list(frame["columns"]), f"{name}: columns"
        for col, want in frame["columns"].items():
            have, where = got["columns"][col], f"{name}.{col}"
            assert have["dtype"] == want["dtype"], f"{where}: dtype"
            if "sha256" in want:
                assert have["sha256"] == want["sha256"], f"{where}: values differ (exact column)"
                continue
            for part in ("stats", "sample"):
                np.testing.assert_allclose(
                    have[part], want[part], rtol=FLOAT_RTOL, atol=FLOAT_ATOL, err_msg=where
                )


def read_reference(path: Path) -> dict[str, Any]:
    """A stored reference file (JSON)."""
    return dict(json.loads(path.read_text()))


def write_reference(path: Path, cases: Mapping[str, Any], source: str) -> None:
    """Write ``cases`` (name -> frames reference) with a note of where they came from."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"source": source, "float_rtol": FLOAT_RTOL, "float_atol": FLOAT_ATOL, "cases": cases}
    text = json.dumps(body, indent=1)
    # One line per list of numbers: a reviewer reads a column's values, not dozens of lines.
    text = re.sub(r"\[\s+([^\[\]]*?)\s+\]", lambda m: "[" + " ".join(m[1].split()) + "]", text)
    path.write_text(text + "\n")
