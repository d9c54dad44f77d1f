"""Playback of encrypted recordings: an AudioSource that decrypts another one as it streams.

The stored object (disk file or S3 object, any :class:`AudioSource` over the ciphertext) starts with
the envelope header (services/storage/envelope.py). :func:`open_encrypted` reads the header, asks
the Crypto Server in one request to unwrap the data key with the first of the wrapped keys whose key
the tenant holds (those the metadata names first), and returns a :class:`DecryptingAudio` whose ``size`` is the plaintext size: a range
request is mapped to the chunks that cover it, only those are read and authenticated (in a worker
thread), and the bytes served are exactly those of the original recording.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from services.storage import envelope
from services.storage.envelope import EnvelopeError, Header
from services.web_services.audio import AudioSource, AudioUnavailable
from services.web_services.crypto_client import CryptoClient, CryptoUnavailable, UnwrapRefused

log = logging.getLogger("callvault.web_services.audio")

HEADER_READ = 4096


async def _read(src: AudioSource, first: int, last: int) -> bytes:
    parts = []
    async with contextlib.aclosing(src.iter_range(first, last)) as chunks:
        async for chunk in chunks:
            parts.append(chunk)
    return b"".join(parts)


def _open_batch(header: Header, data_key: bytes, first_index: int, sealed: list[bytes]) -> list[bytes]:
    return [envelope.decrypt_chunk(header, data_key, first_index + i, s) for i, s in enumerate(sealed)]


@dataclass
class DecryptingAudio:
    """The plaintext of an encrypted stored object, decrypted chunk by chunk as it is read."""

    raw: AudioSource
    header: Header
    data_key: bytes
    content_type: str
    size: int = 0  # the plaintext size, from the header

    def __post_init__(self) -> None:
        self.size = self.header.plaintext_size

    async def iter_range(self, first: int, last: int) -> AsyncGenerator[bytes, None]:
        h = self.header
        c0, c1, start, end = h.chunk_span(first, last)
        buf = bytearray()
        index = c0
        async with contextlib.aclosing(self.raw.iter_range(start, end)) as pieces:
            async for piece in pieces:
                buf += piece
                sealed: list[bytes] = []
                while index + len(sealed) <= c1:
                    need = h.chunk_plain_size(index + len(sealed)) + envelope.TAG_SIZE
                    if len(buf) < need:
                        break
                    sealed.append(bytes(buf[:need]))
                    del buf[:need]
                if not sealed:
                    continue
                plains = await asyncio.to_thread(_open_batch, h, self.data_key, index, sealed)
                for plain in plains:
                    base = index * h.chunk_size
                    lo, hi = max(first - base, 0), min(last - base, len(plain) - 1)
                    index += 1
                    yield plain[lo : hi + 1]
        if index <= c1:
            raise EnvelopeError(f"the stored object ends inside chunk {index}: it is truncated")


async def open_encrypted(
    raw: AudioSource, doc: dict[str, Any], crypto: CryptoClient | None, content_type: str
) -> DecryptingAudio:
    """Read the header of ``raw``, have the data key unwrapped, and return the decrypting source.

    Raises AudioUnavailable: 502 audio_corrupt (not a valid envelope or truncated), 503
    crypto_unavailable (no Crypto Server answered), 403 key_unavailable (the Crypto Server holds no
    key of the recording's tenant that opens it).
    """
    rid = doc.get("id", "?")
    if crypto is None:
        raise AudioUnavailable(503, "crypto_unavailable", "no Crypto Server is configured")
    try:
        if raw.size < envelope.FIXED_SIZE + 4:
            raise EnvelopeError("the stored object is too short to be an encrypted recording")
        # one read holds the header of up to ~7 wrapped 4096-bit keys (one S3 GET, not two)
        head = await _read(raw, 0, min(raw.size, HEADER_READ) - 1)
        size = envelope.header_size(head)
        if size > raw.size:
            raise EnvelopeError("the header is truncated")
        if size > len(head):
            head += await _read(raw, len(head), size - 1)
        header = envelope.parse_header(head[:size])
        if header.total_size != raw.size:
            raise EnvelopeError(
                f"the stored object has {raw.size} bytes, its header says {header.total_size}: truncated or padded"
            )
    except EnvelopeError as exc:
        log.error("recording %s: the encrypted object is damaged: %s", rid, exc)
        raise AudioUnavailable(
            502, "audio_corrupt", f"the recording's stored audio is damaged: {exc}"
        ) from None
    meta = doc.get("encryption") or {}
    preferred = [k for k in meta.get("key_ids", []) if isinstance(k, str) and k in header.wrapped_keys]
    order = preferred + [k for k in header.wrapped_keys if k not in preferred]
    try:
        data_key = await crypto.unwrap(doc["tenant"], [(k, header.wrapped_keys[k]) for k in order], str(rid))
    except UnwrapRefused as exc:
        log.warning("recording %s of %s: no key unwrapped (%s: %s)", rid, doc.get("tenant"), exc.code, exc)
        raise AudioUnavailable(
            403, "key_unavailable", "the Crypto Server holds no key of this tenant that opens the recording"
        ) from None
    except CryptoUnavailable as exc:
        log.error("recording %s: %s", rid, exc)
        raise AudioUnavailable(503, "crypto_unavailable", "the Crypto Server cannot be reached") from None
    return DecryptingAudio(raw, header, data_key, content_type)
