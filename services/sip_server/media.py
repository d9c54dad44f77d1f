"""SDP rewriting for recorded calls (the recording bridge of docs/ARCHITECTURE.md); pure functions.

A recorded call's media is anchored on an MCP: the SIP Server offers the MCP a two-m-line SDP
(``caller`` = A's media, ``callee`` = B's, a placeholder until B answers), then shows each phone the
MCP's port of its own line instead of the other phone's. Only the first audio stream is anchored;
other streams (video) pass end to end unchanged. Payload types are never renumbered, so RFC 4733
``telephone-event`` reaches the far end exactly as offered.

The B2BUA owns the ``o=`` line of every SDP it writes on an anchored leg: :class:`SdpOwner` keeps
one session id per leg and increments the version only when the content changes (RFC 3264 8).
"""

from __future__ import annotations

import copy
import secrets
from dataclasses import asdict, dataclass
from typing import Any

from services.sdp import Media, Origin, SdpParseError, SessionDescription

#: The label of each call leg's line in the bridge SDP (ARCHITECTURE.md).
LABELS = {"a": "caller", "b": "callee"}

# Media attributes that describe a codec or the stream's direction: copied onto bridge lines.
_CODEC_ATTRIBUTES = frozenset(
    {"rtpmap", "fmtp", "ptime", "maxptime", "sendrecv", "sendonly", "recvonly", "inactive"}
)
# Attributes bound to the transport address of the phone that wrote them: dropped when the
# address is replaced by the MCP's (ICE candidates and credentials, explicit RTCP port, mux).
_ADDRESS_ATTRIBUTES = frozenset(
    {
        "candidate",
        "remote-candidates",
        "ice-ufrag",
        "ice-pwd",
        "ice-options",
        "ice-lite",
        "ice-mismatch",
        "end-of-candidates",
        "rtcp",
        "rtcp-mux",
        "rtcp-mux-only",
    }
)


class MediaError(ValueError):
    """An SDP the recording bridge cannot use (no audio stream, unusable answer)."""


def parse(body: bytes) -> SessionDescription:
    """Parse an SDP body; :class:`~services.sdp.SdpParseError` (a ValueError) names the defect."""
    return SessionDescription.parse(body)


def first_audio(sdp: SessionDescription) -> int | None:
    """Index of the first active (port != 0) RTP audio m-line, None if there is none."""
    for i, m in enumerate(sdp.media):
        if m.media == "audio" and m.port != 0 and "RTP/" in m.proto.upper():
            return i
    return None


def _audio(sdp: SessionDescription, what: str) -> tuple[int, Media]:
    index = first_audio(sdp)
    if index is None:
        raise MediaError(f"{what} has no active audio stream")
    return index, sdp.media[index]


def _bridge_line(
    source: Media,
    address: str,
    port: int,
    label: str,
    formats: list[int] | None = None,
) -> Media:
    """A bridge m-line: ``source``'s codec attributes (only for ``formats``), address, port, label."""
    keep = list(source.formats) if formats is None else [pt for pt in formats if pt in source.formats]
    if not keep:
        keep = list(source.formats)
    # rtpmap / fmtp in payload-type order (static types get an rtpmap too, so the MCP never
    # guesses), then ptime, maxptime and the direction.
    attributes: list[tuple[str, str | None]] = []
    fmtp = source.fmtp
    for pt in keep:
        text = source.rtpmap_value(pt)
        if text is not None:
            attributes.append(("rtpmap", f"{pt} {text}"))
        if pt in fmtp:
            attributes.append(("fmtp", f"{pt} {fmtp[pt]}" if fmtp[pt] else str(pt)))
    for name, value in source.attributes:
        if name in _CODEC_ATTRIBUTES and name not in ("rtpmap", "fmtp"):
            attributes.append((name, value))
    attributes.append(("label", label))
    return Media("audio", port, source.proto, keep, connection=address, attributes=attributes)


def _effective_direction(sdp: SessionDescription, index: int) -> str:
    return sdp.media_direction(index)


def bridge_offer(a_offer: SessionDescription, owner: SdpOwner) -> SessionDescription:
    """The initial offer to the MCP: A's audio on the ``caller`` line, a placeholder ``callee`` line.

    The placeholder is ``c=IN IP4 0.0.0.0``, port 9, with A's codecs (ARCHITECTURE.md).
    """
    index, audio = _audio(a_offer, "the caller's offer")
    address, port = a_offer.media_address(index)
    caller = _bridge_line(audio, address, port, "caller")
    _set_direction(caller, _effective_direction(a_offer, index))
    callee = _bridge_line(audio, "0.0.0.0", 9, "callee")
    callee.set_direction("sendrecv")
    return owner.session([caller, callee])


def bridge_update(
    a_sdp: SessionDescription,
    b_sdp: SessionDescription,
    owner: SdpOwner,
) -> SessionDescription:
    """The re-offer to the MCP once B's media is known: both lines carry the real media.

    The caller line keeps A's address and port with the codecs B chose (A's payload types, since B
    answered the offer built from A's), the callee line B's address, port and codecs.
    """
    a_index, a_audio = _audio(a_sdp, "the caller's SDP")
    b_index, b_audio = _audio(b_sdp, "the callee's SDP")
    a_address, a_port = a_sdp.media_address(a_index)
    b_address, b_port = b_sdp.media_address(b_index)
    caller = _bridge_line(a_audio, a_address, a_port, "caller", formats=list(b_audio.formats))
    _set_direction(caller, _effective_direction(a_sdp, a_index))
    callee = _bridge_line(b_audio, b_address, b_port, "callee")
    _set_direction(callee, _effective_direction(b_sdp, b_index))
    return owner.session([caller, callee])


def _set_direction(media: Media, direction: str) -> None:
    media.set_direction(direction)


def mcp_ports(answer: SessionDescription) -> dict[str, tuple[str, int]]:
    """``{"caller": (ip, port), "callee": (ip, port)}`` from the MCP's answer to a bridge offer.

    Lines are found by ``a=label``, else by position (caller first). MediaError if a line is
    missing or rejected (port 0).
    """
    found: dict[str, tuple[str, int]] = {}
    for position, label in enumerate(("caller", "callee")):
        index = answer.find_media(label=label)
        if index is None and position < len(answer.media):
            index = position
        if index is None:
            raise MediaError(f"the MCP's answer has no {label} line")
        address, port = answer.media_address(index)
        if port == 0:
            raise MediaError(f"the MCP rejected the {label} line")
        found[label] = (address, port)
    return found


def anchor(
    sdp: SessionDescription, address: str, port: int, owner: SdpOwner | None = None
) -> SessionDescription:
    """A copy of ``sdp`` whose first audio stream points at ``address``:``port`` (the MCP).

    Used for the offer to B (A's SDP anchored on the MCP's callee port), the answer to A (B's SDP
    anchored on the caller port) and every later offer or answer relayed across a recorded call.
    Codecs, payload types (``telephone-event`` included), direction and ptime are kept; transport
    attributes of the original address (ICE, ``a=rtcp``, rtcp-mux) are dropped from that stream.
    Other streams and session-level attributes are copied, except session-level ICE. The ``o=``
    line is ``owner``'s (the B2BUA's) when given.
    """
    out = copy.deepcopy(sdp)
    index, audio = _audio(out, "the SDP")
    others_need_session_c = any(m.connection is None for i, m in enumerate(out.media) if i != index)
    if others_need_session_c:
        audio.connection = address  # other streams still use the session-level c= of the peer
    else:
        out.connection = address
        audio.connection = None
    audio.port = port
    audio.port_count = 1
    audio.attributes = [(n, v) for n, v in audio.attributes if n not in _ADDRESS_ATTRIBUTES]
    if not others_need_session_c or len(out.media) == 1:
        out.attributes = [(n, v) for n, v in out.attributes if n not in _ADDRESS_ATTRIBUTES]
    if owner is not None:
        out.origin = owner.origin(out)
    return out


def with_direction(sdp: SessionDescription, direction: str) -> SessionDescription:
    """A copy of ``sdp`` with every m-line's direction set to ``direction``."""
    out = copy.deepcopy(sdp)
    out.attributes = [
        (n, v)
        for n, v in out.attributes
        if not (v is None and n in ("sendrecv", "sendonly", "recvonly", "inactive"))
    ]
    for m in out.media:
        if m.port != 0:
            m.set_direction(direction)
    return out


@dataclass
class SdpOwner:
    """The ``o=`` line the B2BUA owns on one leg: fixed session id, version bumped on change.

    Plain data (replicable). :meth:`origin` returns the origin for a description about to be sent:
    the same version as last time when nothing else changed, the next one otherwise (RFC 3264 8:
    "the version MUST be incremented ... if the session description changes").
    """

    address: str
    session_id: str = ""
    version: int = 0
    last: str = ""  # the body last stamped, without its o= line

    def __post_init__(self) -> None:
        if not self.session_id:
            self.session_id = str(secrets.randbits(52) + 1)
            self.version = 1

    def origin(self, sdp: SessionDescription) -> Origin:
        addrtype = "IP6" if ":" in self.address else "IP4"
        probe = copy.copy(sdp)
        probe.origin = Origin("-", "0", 0, "IN", "IP4", "0.0.0.0")
        content = probe.to_bytes().decode("utf-8", "replace")
        if self.last and content != self.last:
            self.version += 1
        self.last = content
        return Origin("callvault", self.session_id, self.version, "IN", addrtype, self.address)

    def session(self, media: list[Media]) -> SessionDescription:
        """A new description with our origin, no session-level c= (each line has its own)."""
        sdp = SessionDescription(
            origin=Origin("callvault", self.session_id, self.version), name="-", media=media
        )
        sdp.origin = self.origin(sdp)
        return sdp

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SdpOwner:
        return cls(**d)


def same_session_version(old: bytes, new: bytes) -> bool:
    """True when ``new`` repeats ``old``'s ``o=`` session id and version: an unchanged offer
    (RFC 3264 8), as sent by session refreshes. False when either does not parse."""
    if not old or not new:
        return False
    try:
        a, b = SessionDescription.parse(old).origin, SessionDescription.parse(new).origin
    except SdpParseError:
        return False
    return (a.username, a.session_id, a.version, a.address) == (
        b.username,
        b.session_id,
        b.version,
        b.address,
    )
