"""The encode stage of the benchmark: what it times is the service's encoder input, as served."""

from __future__ import annotations

import numpy as np
import pandas as pd

from benchmarks.encode import encoder_args, measure_encode
from benchmarks.workload import build_workload, encode_body
from model.core.features import default_schema


def test_encode_stage_times_what_the_service_encodes(tiny_frame: pd.DataFrame) -> None:
    schema = default_schema()
    wl = build_workload(tiny_frame, schema, [5, 20], per_n=2)
    for n, bodies in wl.bodies.items():
        for body, args in zip(bodies, encoder_args(schema, bodies), strict=True):
            assert args[3] == n
            served = encode_body(schema, body)
            for name, x in schema.encode(*args).items():
                np.testing.assert_array_equal(x, served[name])
    result = measure_encode(schema, wl.bodies, runs=3)
    assert set(result) == {"5", "20"}
    for r in result.values():
        assert (r["runs"], r["requests"]) == (3, 2)
        assert r["median_us"] > 0 and r["cpu_median_us"] >= 0
