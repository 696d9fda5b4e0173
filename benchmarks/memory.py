"""Memory: one model's in-process footprint, and a worker's RSS through model swaps."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import Server, http_request, rss_bytes
from model.core.registry import Registry

# Run in a fresh interpreter: RSS after the imports, then after one session is created and run.
_FOOTPRINT = """
import sys, numpy as np, onnxruntime as ort, psutil
from pathlib import Path
from model.core.bundle import load_bundle
def rss():
    return psutil.Process().memory_info().rss
b = load_bundle(Path(sys.argv[1]))
o = ort.SessionOptions(); o.intra_op_num_threads = 1
before = rss()
s = ort.InferenceSession(str(b.onnx_path), o, providers=["CPUExecutionProvider"])
x = b.schema.encode({}, {}, {"video_id": np.arange(1000)}, 1000)
s.run(None, {i.name: x[i.name] for i in s.get_inputs()})
print(before, rss())
"""


def model_footprint(bundle_dir: Path) -> dict[str, int]:
    """RSS added by loading one bundle into an onnxruntime session and scoring 1000 items."""
    proc = subprocess.run(
        [sys.executable, "-c", _FOOTPRINT, str(bundle_dir)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    before, after = (int(x) for x in proc.stdout.split()[-2:])
    return {"rss_before": before, "rss_after": after, "footprint_bytes": after - before}


def publish_copy(registry_dir: Path, version: str, name: str) -> str:
    """Publish the bundle of ``version`` again as ``name`` (a second model to swap to)."""
    registry = Registry(registry_dir)
    if registry.has(name):
        return name
    return registry.publish(registry.version_dir(version), name)


def _activate(server: Server, version: str, token: str) -> float:
    start = time.perf_counter()
    path = f"/admin/models/{version}/activate"
    status, body = http_request(
        server.port, "POST", path, b"", {"Authorization": f"Bearer {token}"}
    )
    if status != 200:
        raise RuntimeError(f"activate {version}: HTTP {status} {body[:300]!r}")
    return time.perf_counter() - start


class RssSampler(threading.Thread):
    """Samples the RSS of a set of processes every ``interval_s`` until stopped; keeps the peak."""

    def __init__(self, pids: list[int], interval_s: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.pids, self.interval_s = pids, interval_s
        self.peak: dict[int, int] = {}
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            for pid in self.pids:
                rss = rss_bytes(pid)
                if rss is not None and rss > self.peak.get(pid, 0):
                    self.peak[pid] = rss
            time.sleep(self.interval_s)

    def stop(self) -> dict[int, int]:
        self._stop_event.set()
        self.join()
        return self.peak


def swap_rss(server: Server, versions: list[str], token: str, settle_s: float = 0.5) -> dict:
    """Activate each version in turn while sampling the worker's RSS every 5 ms.

    Returns the RSS before, the peak during each swap and the RSS after it settles.
    """
    pid = server.worker_pids()[0]
    before = rss_bytes(pid) or 0
    swaps: list[dict[str, Any]] = []
    for version in versions:
        sampler = RssSampler([pid])
        sampler.start()
        seconds = _activate(server, version, token)
        time.sleep(settle_s)
        peak = sampler.stop().get(pid, 0)
        swaps.append(
            {"to": version, "seconds": seconds, "peak_rss": peak, "after_rss": rss_bytes(pid)}
        )
    peak_all = max(s["peak_rss"] for s in swaps)
    return {
        "pid": pid,
        "rss_before": before,
        "swaps": swaps,
        "peak_rss": peak_all,
        "peak_extra_bytes": peak_all - before,
    }
