"""The recording bridge's SDP (docs/ARCHITECTURE.md): two labelled ``m=audio`` lines, offer -> answer.

Sans-I/O. :func:`parse_bridge_offer` finds the ``caller`` and ``callee`` lines of an offer (by
``a=label``; two unlabelled audio lines are taken in order), what each leg's party address is (a
placeholder ``0.0.0.0`` / port 9 line has none yet) and which payload types the engine must know;
:func:`build_answer` answers both lines with the MCP's address and its two leg ports, G.711 plus
telephone-event, the same labels and the RFC 3264 answer direction.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.sdp import SdpParseError, SessionDescription, create_answer, negotiate_formats

LABELS = ("caller", "callee")  # leg 0, leg 1
SUPPORTED = ("PCMU", "PCMA")
#: Encodings the engine is told about (others are relayed but not decoded).
ENGINE_ENCODINGS = frozenset({"PCMU", "PCMA", "TELEPHONE-EVENT", "CN"})
_NO_ADDRESS = frozenset({"0.0.0.0", "::", ""})
_DISCARD_PORT = 9  # RFC 863 discard: the conventional "no port yet"


class OfferError(ValueError):
    """The offer cannot be answered; ``status`` (400/488) and ``reason`` are the SIP answer."""

    def __init__(self, reason: str, status: int = 488) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass
class LegOffer:
    """What the offer says about one leg of the bridge."""

    leg: int  # 0 = caller, 1 = callee
    index: int  # m-line index in the offer
    address: tuple[str, int] | None  # the party's RTP address, None while it is a placeholder
    formats: list[int]  # negotiated payload types (codec, then telephone-event if offered)
    payload_types: dict[int, str]  # every offered pt the engine understands -> encoding
    direction: str  # offered direction

    @property
    def label(self) -> str:
        return LABELS[self.leg]

    @property
    def codec(self) -> str:
        return self.payload_types.get(self.formats[0], "") if self.formats else ""


@dataclass
class BridgeOffer:
    sdp: SessionDescription
    legs: list[LegOffer]  # [caller, callee]


def parse_sdp(body: bytes, content_type: str | None) -> SessionDescription:
    """The offer in a request body; OfferError(400) when missing or malformed."""
    if not body.strip():
        raise OfferError("SDP offer is missing", 400)
    if content_type is not None and content_type.split(";", 1)[0].strip().lower() != "application/sdp":
        raise OfferError(f"Unsupported body type {content_type[:60]!r} (application/sdp expected)", 415)
    try:
        return SessionDescription.parse(body)
    except SdpParseError as exc:
        raise OfferError(f"Malformed SDP: {exc}", 400) from None


def parse_bridge_offer(sdp: SessionDescription) -> BridgeOffer:
    """The two legs of a bridge offer; OfferError(488) when the offer is not a recording bridge or
    a leg offers no G.711 codec."""
    indices: list[int | None] = [sdp.find_media(label=label, media="audio") for label in LABELS]
    if None in indices:
        audio = [i for i, m in enumerate(sdp.media) if m.media == "audio"]
        if len(audio) != 2 or any(sdp.media[i].label is not None for i in audio):
            raise OfferError("Expected two audio streams labelled caller and callee")
        indices = [audio[0], audio[1]]
    legs: list[LegOffer] = []
    for leg, index in enumerate(indices):
        assert index is not None
        media = sdp.media[index]
        if media.port == 0:
            raise OfferError(f"The {LABELS[leg]} stream is disabled (port 0)")
        formats = negotiate_formats(media, SUPPORTED, telephone_event=True)
        if not formats:
            raise OfferError(f"No common codec on the {LABELS[leg]} stream (PCMU or PCMA required)")
        try:
            host, port = sdp.media_address(index)
        except ValueError as exc:
            raise OfferError(str(exc), 400) from None
        address = None if host in _NO_ADDRESS or port in (0, _DISCARD_PORT) else (host, port)
        payload_types = {pt: enc for pt, enc in media.rtpmap.items() if enc.upper() in ENGINE_ENCODINGS}
        legs.append(LegOffer(leg, index, address, formats, payload_types, sdp.media_direction(index)))
    return BridgeOffer(sdp, legs)


def build_answer(
    offer: BridgeOffer,
    address: str,
    ports: tuple[int, int],
    *,
    session_id: str | None = None,
    version: int | None = None,
) -> SessionDescription:
    """The answer: both legs on ``address`` with their ports; any other m-line rejected (port 0).

    ``session_id``/``version`` keep the ``o=`` line of earlier answers in the dialog (RFC 3264 8:
    the version increases by one with every new answer).
    """
    per_line: list[int | None] = [None] * len(offer.sdp.media)
    for leg in offer.legs:
        per_line[leg.index] = ports[leg.leg]
    answer = create_answer(
        offer.sdp, address, per_line, SUPPORTED, telephone_event=True, session_id=session_id
    )
    if version is not None:
        answer.origin.version = version
    for leg in offer.legs:
        media = answer.media[leg.index]
        if media.label is None:
            media.set_attribute("label", leg.label)
    return answer
