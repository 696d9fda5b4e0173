"""The simulated worlds whose reference values ``test_simulate.py`` checks, and how to rewrite them.

The stored values are those of main's simulator before the structure knobs existed (commit
1cdee94): the "default" preset, and ``SimConfig``'s own default, must keep producing that world.
Rewrite the file only on purpose (a deliberate change of the world), and say why in the commit:

    .venv/bin/python -m tests.model.training.sim_reference
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from model.simulator.world import SimConfig, SimData, preset_config, simulate
from tests.reference import frames_reference, write_reference

REFERENCE_FILE = Path(__file__).with_name("sim_reference.json")
FRAMES = ("log", "users", "videos", "video_truth")
SMALL_WORLD: dict[str, Any] = {
    "n_users": 300, "n_videos": 600, "n_authors": 120, "n_impressions": 5_000,
}  # fmt: skip
CASES: dict[str, SimConfig] = {
    "default-seed0": preset_config("default", n_impressions=20_000, seed=0),
    "default-seed3": preset_config("default", n_impressions=20_000, seed=3),
    "rho0.0-seed1": SimConfig(**SMALL_WORLD, seed=1, task_correlation=0.0),
    "rho1.0-seed2": SimConfig(**SMALL_WORLD, seed=2, task_correlation=1.0),
}
SOURCE = (
    "simulator of main 1cdee94 (before presets); this tree reproduced its sha256 digests of every "
    "column's bytes on numpy's baseline kernels when the file was written"
)


def world_reference(data: SimData) -> dict[str, Any]:
    """The reference of one simulated world's four frames."""
    return frames_reference({name: getattr(data, name) for name in FRAMES})


def main() -> None:
    """Simulate every case and write ``REFERENCE_FILE``."""
    cases = {name: world_reference(simulate(cfg)) for name, cfg in CASES.items()}
    write_reference(REFERENCE_FILE, cases, SOURCE)
    print(f"wrote {REFERENCE_FILE}")


if __name__ == "__main__":
    main()
