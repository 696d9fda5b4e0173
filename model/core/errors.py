"""The one base of vidrank's domain errors (stdlib only).

Every error the core or the service raises on purpose derives from :class:`VidrankError` and
carries the same three things: a stable ``code`` (a class attribute, e.g. ``invalid_fusion``),
a human-readable ``message``, and ``field``, the dotted path of the offending value when there is
one (``fusion.weights.clik``). ``details`` holds any extra structured data a client may use. The
service maps the classes to HTTP statuses in one table (``service/errors.py``); nothing here
knows about HTTP.
"""

from __future__ import annotations

from typing import Any, ClassVar


class VidrankError(Exception):
    """Base of all domain errors: ``code``, ``message``, ``field`` and optional ``details``."""

    code: ClassVar[str] = "error"

    def __init__(
        self, message: str, field: str | None = None, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.details = details

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


SHOWN_CHARS = 64  # client-supplied text echoed in a message or a field path is cut to this


def shown(text: str, limit: int = SHOWN_CHARS) -> str:
    """``text`` cut to ``limit`` characters (marked with "..."), for echoing client input.

    Error messages and field paths repeat names and values a client sent; cutting them keeps a
    hostile 16 MB key from coming back in the response and the logs.
    """
    return text if len(text) <= limit else f"{text[:limit]}..."
