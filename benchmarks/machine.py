"""What the numbers were measured on: CPU, cores, SIMD flags and library versions."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("numpy", "onnxruntime", "onnx", "torch", "fastapi", "uvicorn", "pydantic", "orjson")
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "fma")


def _cpuinfo() -> dict[str, str]:
    """The first processor block of /proc/cpuinfo (empty off Linux)."""
    path = Path("/proc/cpuinfo")
    if not path.exists():
        return {}
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            break
        key, _, value = line.partition(":")
        out[key.strip()] = value.strip()
    return out


def usable_cores() -> int:
    """CPUs this process may run on (the affinity mask, not the host's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def wrk_version(wrk: str | None) -> str | None:
    """`wrk -v` first line, or None when wrk is absent."""
    if wrk is None:
        return None
    proc = subprocess.run([wrk, "-v"], capture_output=True, text=True, check=False)
    text = (proc.stdout + proc.stderr).strip().splitlines()
    return text[0] if text else "unknown"


def machine_info(wrk: str | None = None) -> dict[str, Any]:
    """A JSON-ready description of the machine and software stack."""
    cpu = _cpuinfo()
    flags = set(cpu.get("flags", "").split())
    return {
        "hostname": socket.gethostname(),
        "cpu_model": cpu.get("model name") or platform.processor() or "unknown",
        "cores": usable_cores(),
        "cpu_count": os.cpu_count(),
        "flags": {flag: flag in flags for flag in FLAGS},
        "avx2": "avx2" in flags,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "packages": {p: _version(p) for p in PACKAGES},
        "wrk": wrk_version(wrk),
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def machine_slug(info: dict[str, Any]) -> str:
    """A file-name-safe machine name: hostname plus core count."""
    host = "".join(c if c.isalnum() or c in "-_" else "-" for c in str(info["hostname"]))
    return f"{host or 'machine'}-{info['cores']}c"
