"""Keyed signatures of index files: HMAC-SHA256 over the header, for files served by others.

The per-tensor SHA-256 digests in a header detect accidents (a truncated copy, a flipped bit),
not adversaries: anyone who edits a file can recompute them. A signature can only be made with
the key. It covers the whole header (format, config, metadata, and every tensor's digest, which
covers its dtype, shape and bytes), so a signed file that verifies holds exactly what its
signer wrote.

The key is the ``key=`` argument of the save and load functions, else ``$SQUEEZE_INDEX_KEY``
(its UTF-8 bytes; unset or empty: no key). Saving with a key signs; loading with a key refuses
an unsigned file or a wrong signature (:class:`~squeeze.errors.IndexFileError`); loading without
a key does not check a signature.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os

from .errors import IndexFileError

ENV = "SQUEEZE_INDEX_KEY"
FIELD = "signature"


def resolve_key(key: bytes | str | None) -> bytes | None:
    """The signing key: ``key`` (bytes, or a str as UTF-8), else ``$SQUEEZE_INDEX_KEY``, else
    ``None``."""
    if key is None:
        env = os.environ.get(ENV, "")
        return env.encode() if env else None
    if isinstance(key, str):
        key = key.encode()
    if not isinstance(key, (bytes, bytearray)):
        raise TypeError(f"key must be bytes or str, got {type(key).__name__}")
    if not key:
        raise ValueError("key must not be empty")
    return bytes(key)


def _body(header: dict) -> bytes:
    """The canonical JSON of the header without its signature."""
    body = {k: v for k, v in header.items() if k != FIELD}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def sign(header: dict, key: bytes) -> str:
    """The hex HMAC-SHA256 of ``header`` (without its signature) under ``key``."""
    return hmac.new(key, _body(header), hashlib.sha256).hexdigest()


def verify(header: dict, key: bytes | None, where: str) -> None:
    """Check ``header``'s signature under ``key`` (nothing to check without a key)."""
    if key is None:
        return
    got = header.get(FIELD)
    if got is None:
        raise IndexFileError(
            f"{where} is not signed, and a key was given (key= or ${ENV}): refusing an "
            "unsigned file"
        )
    if not hmac.compare_digest(str(got), sign(header, key)):
        raise IndexFileError(
            f"{where}: the signature does not verify under the given key: the file was "
            "altered, or signed with another key"
        )
