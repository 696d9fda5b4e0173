"""service/http/server.py: listening sockets (TCP_NODELAY, SO_REUSEPORT), GC tuning and the
metric files a worker drops when its supervisor is gone, without a server."""

from __future__ import annotations

import gc
import os
import socket
import subprocess
import sys
from pathlib import Path

from service.http.server import GC_THRESHOLD, _cleanup_metrics, _tune_gc, bind_socket


def test_listening_socket_options_reach_accepted_connections() -> None:
    listener = bind_socket("127.0.0.1", 0, reuse_port=True)
    try:
        assert listener.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
        assert listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        assert listener.proto == socket.IPPROTO_TCP  # what asyncio checks before setting NODELAY
        port = listener.getsockname()[1]
        # A second worker can listen on the same port (the kernel spreads connections).
        twin = bind_socket("127.0.0.1", port, reuse_port=True)
        twin.close()
        with socket.create_connection(("127.0.0.1", port)):
            conn, _ = listener.accept()
            with conn:
                assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        listener.close()


def test_single_process_socket_has_no_reuseport() -> None:
    sock = bind_socket("127.0.0.1", 0, reuse_port=False)
    try:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 0
    finally:
        sock.close()


def _collectable(obj: object) -> bool:
    """Whether the collector's generations (what a collection walks) hold ``obj``."""
    return any(o is obj for o in gc.get_objects())


def test_tune_gc_freezes_start_up_objects() -> None:
    """What start-up loaded leaves the generations a collection walks; later objects do not."""
    before = gc.get_threshold()
    # Stands for the model, modules and settings loaded before serving (a list of a list: always
    # tracked by the collector, unlike a dict of numbers).
    loaded: list[list[int]] = [[]]
    assert _collectable(loaded)
    try:
        _tune_gc()
        assert not _collectable(loaded)
        request: list[list[int]] = [[]]
        assert _collectable(request)
        assert gc.get_threshold() == GC_THRESHOLD
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_a_worker_outliving_its_supervisor_removes_dead_workers_metric_files(
    tmp_path: Path,
) -> None:
    # a worker killed before it could drop its files leaves them; the next worker out drops them
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    live = os.getppid()  # alive for the whole test
    names = [f"histogram_{os.getpid()}.db", f"counter_{dead}.db",
             f"gauge_livesum_{dead}.db", f"counter_{live}.db"]  # fmt: skip
    for name in names:
        (tmp_path / name).write_bytes(b"")
    not_our_parent = -1
    _cleanup_metrics(tmp_path, not_our_parent)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"counter_{live}.db"]  # a live one's
    (tmp_path / f"counter_{live}.db").unlink()
    _cleanup_metrics(tmp_path, not_our_parent)
    assert not tmp_path.exists()  # the last one out removes the directory
    kept = tmp_path.parent / f"{tmp_path.name}-kept"
    kept.mkdir()
    (kept / f"counter_{dead}.db").write_bytes(b"")
    _cleanup_metrics(kept, os.getppid())  # our parent stands for a live supervisor: it owns them
    assert [p.name for p in kept.iterdir()] == [f"counter_{dead}.db"]
