"""Admin bearer tokens: from ``VIDRANK_ADMIN_TOKEN`` and/or a file, several at once.

A Kubernetes Secret mounted as a file is updated in place (an atomic symlink swap), so the file
is read on every admin call (a few bytes) and parsed again when its content changed (the one
"changed?" check, ``model.core.fileio.content_stamp``): a new token works and
a removed one stops working without a restart. Rotation without downtime: add the new token on
a second line, move the clients over, remove the old line. Lines are stripped; blank lines and
lines starting with ``#`` are ignored. A missing or unreadable file accepts no token from it
(logged once per change): a credential store that cannot be read must not fall back to an older
copy.
"""

from __future__ import annotations

import logging
import secrets
import threading
from pathlib import Path

from model.core.fileio import content_stamp
from service.logging import log_fields

log = logging.getLogger("vidrank.admin")


class AdminTokens:
    """The set of accepted tokens; ``check`` compares a credential against all of them."""

    def __init__(self, token: str | None, path: Path | None) -> None:
        self._fixed = (token.encode(),) if token else ()
        self.path = path
        self._lock = threading.Lock()
        self._stamp: object = None
        self._from_file: tuple[bytes, ...] = ()

    @property
    def configured(self) -> bool:
        """Whether admin is enabled at all (a token or a token file is configured)."""
        return bool(self._fixed) or self.path is not None

    def current(self) -> tuple[bytes, ...]:
        """Every token accepted right now (re-reading the file if it changed)."""
        if self.path is None:
            return self._fixed
        with self._lock:
            data = self._read_bytes()
            stamp = content_stamp(data) if isinstance(data, bytes) else ("error", data.errno)
            if stamp != self._stamp:
                self._stamp = stamp
                self._from_file = self._parse(data)
            return self._fixed + self._from_file

    def check(self, credential: bytes) -> bool:
        """Constant-time comparison against every accepted token (no early exit)."""
        ok = False
        for token in self.current():
            ok |= secrets.compare_digest(credential, token)
        return ok

    def _read_bytes(self) -> bytes | OSError:
        """The file's bytes, or why it cannot be read (which grants nothing, see ``_parse``)."""
        assert self.path is not None
        try:
            return self.path.read_bytes()
        except OSError as e:
            return e

    def _parse(self, data: bytes | OSError) -> tuple[bytes, ...]:
        try:
            if isinstance(data, OSError):
                raise data
            text = data.decode("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) else str(e)
            log_fields(
                log, logging.WARNING, "admin token file unreadable; it grants nothing",
                error=f"{type(e).__name__}: {reason}",
            )  # fmt: skip
            return ()
        tokens = tuple(
            line.strip().encode()
            for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")
        )
        log_fields(log, logging.INFO, "admin token file loaded", tokens=len(tokens))
        return tokens
