"""The /rank body as bytes: media type, size and content coding, checked before any parsing.

A body must be declared as JSON (``Content-Type: application/json`` or ``application/*+json``;
none at all is a 415 too). It may be gzip-compressed (``Content-Encoding: gzip``): backends
compress large candidate lists. Both the body as sent and the body after decompression are
bounded by the same limit, and decompression stops one byte past it, so a small "zip bomb"
costs no more memory than an honest body of the largest size.
"""

from __future__ import annotations

import zlib

from starlette.requests import Request

from model.core.errors import shown
from service.errors import MalformedEncoding, PayloadTooLarge, UnsupportedMediaType
from service.http.responses import JSON

GZIP = "gzip"
IDENTITY = "identity"
_GZIP_WBITS = 16 + zlib.MAX_WBITS  # a gzip header and trailer around a deflate stream


def check_content_type(request: Request) -> None:
    """415 unless the body is declared as JSON."""
    ctype = request.headers.get("content-type") or ""
    media = ctype.split(";", 1)[0].strip().lower()
    if media != JSON and not (media.startswith("application/") and media.endswith("+json")):
        got = shown(media) if media else "no Content-Type"
        raise UnsupportedMediaType(f"send Content-Type: {JSON} (got {got})")


def content_coding(request: Request) -> str:
    """``gzip`` or ``identity``; any other Content-Encoding is a 415."""
    coding = (request.headers.get("content-encoding") or IDENTITY).strip().lower()
    if coding in (GZIP, "x-gzip"):
        return GZIP
    if coding == IDENTITY:
        return IDENTITY
    raise UnsupportedMediaType(
        f"Content-Encoding {shown(coding)!r} is not supported; send gzip or an uncompressed body"
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The body as sent, refusing more than ``limit`` bytes without reading them all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"body of {declared} bytes exceeds {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def decode(body: bytes, coding: str, limit: int) -> bytes:
    """The body after its content coding: gunzipped (at most ``limit`` bytes) or as it is."""
    return gunzip(body, limit) if coding == GZIP else body


def gunzip(data: bytes, limit: int) -> bytes:
    """One gzip member decompressed; 413 past ``limit`` bytes of output, 400 if not gzip."""
    inflater = zlib.decompressobj(wbits=_GZIP_WBITS)
    try:
        out = inflater.decompress(data, limit + 1)  # stops one byte past the limit
    except zlib.error as e:
        raise MalformedEncoding(f"body is not valid gzip: {e}") from None
    if len(out) > limit:
        raise PayloadTooLarge(f"body exceeds {limit} bytes once decompressed")
    if not inflater.eof:
        raise MalformedEncoding("body is not valid gzip: the stream is truncated")
    if inflater.unused_data:
        raise MalformedEncoding("body is not valid gzip: data after the end of the stream")
    return out
