"""Print numpy's dispatchable SIMD targets that this CPU has, for ``NPY_DISABLE_CPU_FEATURES``.

``make pytest-baseline`` runs the CPU-sensitive tests with all of them disabled: numpy then runs
its baseline kernels, as on the oldest CPU it supports. Computed at run time, so the same command
works on any machine (numpy refuses to disable a baseline feature, so only these are listed).
"""

from __future__ import annotations

from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__


def dispatched_features() -> list[str]:
    """The dispatch targets numpy was built with that this CPU supports."""
    return [name for name in __cpu_dispatch__ if __cpu_features__.get(name)]


if __name__ == "__main__":
    print(" ".join(dispatched_features()))
