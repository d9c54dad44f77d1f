"""SDP (RFC 4566) parse/serialize and offer/answer helpers (RFC 3264); sans-I/O."""

from .offer_answer import answer_direction, create_answer, hold_state, negotiate_formats, rejected_media
from .session import (
    DIRECTIONS,
    STATIC_PAYLOAD_TYPES,
    Media,
    Origin,
    SdpParseError,
    SessionDescription,
    TimeDescription,
    audio_media,
    new_session,
)

__all__ = [
    "DIRECTIONS",
    "STATIC_PAYLOAD_TYPES",
    "Media",
    "Origin",
    "SdpParseError",
    "SessionDescription",
    "TimeDescription",
    "answer_direction",
    "audio_media",
    "create_answer",
    "hold_state",
    "negotiate_formats",
    "new_session",
    "rejected_media",
]
