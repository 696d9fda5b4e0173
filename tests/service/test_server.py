"""server.py: listening sockets (TCP_NODELAY, SO_REUSEPORT) and GC tuning, without a server."""

from __future__ import annotations

import gc
import socket

from service.http.server import GC_THRESHOLD, _tune_gc, bind_socket


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


def test_tune_gc_freezes_start_up_objects() -> None:
    before = gc.get_threshold()
    try:
        _tune_gc()
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == GC_THRESHOLD
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
