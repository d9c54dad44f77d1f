"""Offer/answer helpers (RFC 3264): direction, codec choice, hold detection, building an answer.

All functions are pure: they read parsed :class:`SessionDescription` / :class:`Media` objects and
return new values; nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Sequence

from .session import DIRECTIONS, Media, SessionDescription, new_session

__all__ = [
    "answer_direction",
    "create_answer",
    "hold_state",
    "negotiate_formats",
    "rejected_media",
]

_ANSWER_DIRECTION = {
    "sendrecv": "sendrecv",
    "sendonly": "recvonly",
    "recvonly": "sendonly",
    "inactive": "inactive",
}

#: Encodings that are not a codec of their own (RFC 4733 events, RFC 3389 comfort noise, FEC).
_AUXILIARY = frozenset({"TELEPHONE-EVENT", "CN", "RED", "ULPFEC"})


def answer_direction(offered: str) -> str:
    """The direction to answer with when we are willing to send and receive (RFC 3264 section 6.1).

    ``sendonly`` -> ``recvonly``, ``recvonly`` -> ``sendonly``, ``inactive`` -> ``inactive``,
    ``sendrecv`` -> ``sendrecv``. ValueError for anything else.
    """
    try:
        return _ANSWER_DIRECTION[offered]
    except KeyError:
        raise ValueError(f"unknown direction {offered!r}; expected one of {', '.join(DIRECTIONS)}") from None


def negotiate_formats(
    offer: Media, supported: Sequence[str] = ("PCMU", "PCMA"), *, telephone_event: bool = True
) -> list[int]:
    """The offered payload types we accept, in the offerer's order (RFC 3264 section 6.1).

    That is the first offered payload type whose encoding is in ``supported`` (case-insensitive; the
    offerer's preference order wins), plus the offered ``telephone-event`` payload type (RFC 4733)
    when ``telephone_event`` is true, preferring one whose clock rate matches the chosen codec.
    ``[]`` if the m-line is not audio or offers no supported codec (telephone-event alone is not
    enough). The offered port is not looked at: a port-0 stream is the caller's to reject.
    """
    if offer.media != "audio":
        return []
    wanted = {name.upper() for name in supported}
    rtpmap = offer.rtpmap
    codec = next(
        (
            pt
            for pt in offer.formats
            if rtpmap.get(pt, "").upper() in wanted and rtpmap[pt].upper() not in _AUXILIARY
        ),
        None,
    )
    if codec is None:
        return []
    chosen = [codec]
    if telephone_event:
        events = [pt for pt in offer.formats if rtpmap.get(pt, "").upper() == "TELEPHONE-EVENT"]
        rate = offer.clock_rate(codec)
        same_rate = [pt for pt in events if offer.clock_rate(pt) == rate]
        if same_rate or events:
            chosen.append((same_rate or events)[0])
    return sorted(set(chosen), key=offer.formats.index)


def hold_state(media: Media, session: SessionDescription) -> bool:
    """Whether the peer that sent ``session`` puts ``media`` on hold.

    RFC 3264 section 8.4: the holder offers ``sendonly`` (or ``inactive``); a direction attribute at
    session level applies to m-lines without their own. RFC 2543 phones instead set the connection
    address to ``0.0.0.0`` (RFC 3264 section 8.4 tells answerers to still recognise it).
    """
    direction = media.explicit_direction or session.direction
    if direction in ("sendonly", "inactive"):
        return True
    connection = media.connection if media.connection is not None else session.connection
    return connection is not None and connection.split("/", 1)[0] == "0.0.0.0"


def rejected_media(offer: Media) -> Media:
    """The answer to an m-line we decline: same media/proto, port 0 (RFC 3264 section 6).

    RFC 4566 needs at least one format on the line, so the first offered one is kept.
    """
    return Media(
        offer.media,
        0,
        offer.proto,
        offer.formats[:1],
        format_names=[] if offer.formats else offer.format_names[:1],
    )


def create_answer(
    offer: SessionDescription,
    address: str,
    ports: Sequence[int | None],
    supported: Sequence[str] = ("PCMU", "PCMA"),
    *,
    telephone_event: bool = True,
    username: str = "callvault",
    session_id: str | None = None,
    direction: str | None = None,
) -> SessionDescription:
    """Answer every m-line of ``offer`` (RFC 3264 section 6: same number of m-lines, same order).

    ``ports[i]`` is our RTP port for m-line ``i`` (None or missing: reject it). An m-line is also
    rejected (port 0) when it was offered with port 0 or no supported codec is offered. An accepted
    line carries the negotiated payload types with the offer's ``rtpmap``/``fmtp`` lines, the
    answered direction (``direction`` overrides the one derived with :func:`answer_direction`), the
    offer's ``a=label`` and ``a=ptime``. The session ``c=`` is ``address``.
    """
    answer = new_session(address, username=username, session_id=session_id)
    for index, offered in enumerate(offer.media):
        port = ports[index] if index < len(ports) else None
        formats = negotiate_formats(offered, supported, telephone_event=telephone_event)
        if port is None or offered.port == 0 or not formats or not port:
            answer.media.append(rejected_media(offered))
            continue
        media = Media(offered.media, port, offered.proto, formats)
        fmtp = offered.fmtp
        for pt in formats:
            value = offered.rtpmap_value(pt)
            if value is not None:
                media.attributes.append(("rtpmap", f"{pt} {value}"))
            if pt in fmtp:
                media.attributes.append(("fmtp", f"{pt} {fmtp[pt]}" if fmtp[pt] else str(pt)))
        if offered.ptime is not None:
            media.attributes.append(("ptime", str(offered.ptime)))
        if offered.label is not None:
            media.attributes.append(("label", offered.label))
        media.set_direction(direction or answer_direction(offer.media_direction(index)))
        answer.media.append(media)
    return answer
