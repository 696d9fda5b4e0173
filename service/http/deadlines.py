"""A deadline on reading a request body, for every route (pure ASGI middleware).

uvicorn hands the app a request as soon as its headers are complete and then waits for body
chunks as long as the client likes: a client that declares 1 MB and sends ten bytes holds its
connection, its task and its buffer indefinitely. Here each ``receive()`` before the body is
complete is bounded by ``body_timeout_s`` from the request's start. When it passes, the client
gets ``408`` with the usual error body and ``Connection: close``, and the app sees a disconnect
(so it stops: no handler runs on half a body); whatever the app answers after that is dropped.
``service/http/protocol.py`` closes the connection a second later should nobody be reading at all.
"""

from __future__ import annotations

import time

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics
from service.errors import RequestTimeout, domain_error_body, http_headers

_TIMEOUT = RequestTimeout("the request body did not arrive in time")


class ReadDeadlineMiddleware:
    """Answers 408 when a request body is not complete ``body_timeout_s`` after its start."""

    def __init__(self, app: ASGIApp, body_timeout_s: float) -> None:
        self.app = app
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        deadline = time.monotonic() + self.body_timeout_s
        body_done = False
        answered = False  # by us, with a 408: the app's own response goes nowhere
        started = False

        async def guarded_receive() -> Message:
            nonlocal body_done, answered
            if answered:
                return {"type": "http.disconnect"}
            if body_done:
                return await receive()
            message: Message | None = None
            with anyio.move_on_after(max(0.0, deadline - time.monotonic())):
                message = await receive()
            if message is None:
                answered = True
                if not started:
                    metrics.CONNECTIONS_CLOSED.labels("body_timeout").inc()
                    await _send_timeout(send)
                return {"type": "http.disconnect"}
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if answered:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        await self.app(scope, guarded_receive, guarded_send)


async def _send_timeout(send: Send) -> None:
    body = domain_error_body(_TIMEOUT)
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    headers += [(k.lower().encode(), v.encode()) for k, v in (http_headers(_TIMEOUT) or {}).items()]
    await send({"type": "http.response.start", "status": 408, "headers": headers})
    await send({"type": "http.response.body", "body": body})
