"""The OpenAPI 3.1 document of the Web Services API, served at ``GET /api/v1/openapi.json``.

Written as data beside the handlers (app.py); a unit test checks that every route of the application
is described here and every described path is routed.
"""

from __future__ import annotations

from typing import Any

from services.web_services.store import MAX_LIMIT

VERSION = "1.0.0"


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _q(name: str, description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema or {"type": "string"},
    }


_ID = {
    "name": "id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$"},
}
# the recording's format (IvrProfile.format) picks the type: wav, mp3, opus (Ogg), flac
_AUDIO = {
    t: {"schema": {"type": "string", "format": "binary"}}
    for t in ("audio/wav", "audio/mpeg", "audio/ogg", "audio/flac")
}
_COMMON = {"401": _error("Missing or invalid API key"), "404": _error("No such recording for this tenant")}

_STREAM = {
    "type": "object",
    "properties": {
        "label": {"type": "string", "enum": ["caller", "callee"]},
        "ssrc": {"type": "integer"},
        "packets": {"type": "integer"},
        "bytes": {"type": "integer"},
        "lost": {"type": "integer"},
        "late": {"type": "integer"},
        "duplicates": {"type": "integer"},
        "reordered": {"type": "integer"},
        "invalid": {
            "type": "integer",
            "minimum": 0,
            "description": "junk datagrams (neither RTP nor RTCP) on the leg's ports; absent in older events",
        },
        "jitter_ms": {"type": "number"},
        "gap_total_ms": {"type": "number"},
        "longest_gap_ms": {"type": "number"},
        "dtmf": {"type": "string", "description": "RFC 4733 digits received on this leg"},
    },
}

_RECORDING = {
    "type": "object",
    "description": "The recording metadata document (docs/ARCHITECTURE.md). Timestamps are UTC, "
    "YYYY-MM-DDTHH:MM:SS.ffffffZ.",
    "required": ["id", "tenant", "call_id", "start", "end", "storage"],
    "additionalProperties": False,
    "properties": {
        "id": {"type": "string"},
        "tenant": {"type": "string"},
        "session_id": {"type": "string", "description": "recording session; several parts may share it"},
        "part": {"type": "integer", "minimum": 1},
        "call_id": {"type": "string", "description": "SIP Call-ID of the A leg"},
        "from_uri": {"type": "string"},
        "from_display": {"type": "string"},
        "to_uri": {"type": "string"},
        "to_display": {"type": "string"},
        "caller": {"type": "string", "description": "caller's user part (number)"},
        "callee": {"type": "string", "description": "callee's user part (number)"},
        "direction": {"type": "string"},
        "start": {"type": "string", "format": "date-time"},
        "end": {"type": "string", "format": "date-time"},
        "duration": {"type": "number", "description": "seconds"},
        "codec": {"type": "string"},
        "format": {"type": "string", "enum": ["wav", "mp3", "opus", "flac"]},
        "channels": {"type": "integer", "enum": [1, 2]},
        "sample_rate": {"type": "integer"},
        "size": {"type": "integer", "description": "bytes"},
        "sha256": {"type": "string", "pattern": "^([0-9a-f]{64})?$"},
        "storage": {
            "type": "object",
            "required": ["kind", "key"],
            "properties": {"kind": {"type": "string", "enum": ["disk", "s3"]}, "key": {"type": "string"}},
        },
        "mcp": {"type": "string"},
        "streams": {"type": "array", "items": {"$ref": "#/components/schemas/Stream"}},
        "labels": {"type": "array", "items": {"type": "string"}},
        "extra": {
            "type": "object",
            "description": "fields the producer sent that this version does not know",
        },
        "encryption": {
            "type": ["object", "null"],
            "description": "Envelope of an encrypted recording (docs/CRYPTO.md); never a key",
            "properties": {
                "algorithm": {"type": "string"},
                "version": {"type": "integer"},
                "chunk_size": {"type": "integer"},
                "key_ids": {"type": "array", "items": {"type": "string", "pattern": "^[0-9a-f]{64}$"}},
                "plaintext_size": {"type": "integer"},
                "plaintext_sha256": {"type": "string"},
            },
        },
    },
}


def document() -> dict[str, Any]:
    """The OpenAPI document."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "callvault Web Services",
            "version": VERSION,
            "description": "Search, metadata and playback of call recordings, per tenant. Authenticate "
            "with the tenant's API key: `Authorization: Bearer <api key>`. Errors are JSON "
            '`{"error": {"status", "code", "message"}}`.',
        },
        "servers": [{"url": "/"}],
        "security": [{"apiKey": []}],
        "paths": {
            "/healthz": {
                "get": {
                    "summary": "Liveness and store health",
                    "security": [],
                    "responses": {
                        "200": {
                            "description": "Healthy",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        },
                        "503": {"description": "The metadata store is unavailable"},
                    },
                }
            },
            "/api/v1/openapi.json": {
                "get": {
                    "summary": "This document",
                    "security": [],
                    "responses": {"200": {"description": "OpenAPI 3.1"}},
                }
            },
            "/api/v1/recordings": {
                "get": {
                    "summary": "Search the tenant's recordings, newest first",
                    "parameters": [
                        _q("call_id", "SIP Call-ID (exact)"),
                        _q("session_id", "recording session id (exact): all parts of a recording"),
                        _q("party", "caller or callee user part (exact) or a substring of the From/To URI"),
                        _q("direction", "call direction (exact)"),
                        _q("label", "recordings carrying this label"),
                        _q(
                            "start_after",
                            "start >= this ISO 8601 time (UTC if no offset)",
                            {"type": "string", "format": "date-time"},
                        ),
                        _q(
                            "start_before",
                            "start < this ISO 8601 time",
                            {"type": "string", "format": "date-time"},
                        ),
                        _q(
                            "limit",
                            f"page size, 1-{MAX_LIMIT} (default 50)",
                            {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT},
                        ),
                        _q("cursor", "the `next` value of the previous page"),
                    ],
                    "responses": {
                        "200": {
                            "description": "One page of recordings",
                            "content": {
                                "application/json": {"schema": {"$ref": "#/components/schemas/Page"}}
                            },
                        },
                        "400": _error("A bad filter, limit, cursor or unknown parameter"),
                        "401": _COMMON["401"],
                    },
                }
            },
            "/api/v1/recordings/{id}": {
                "parameters": [_ID],
                "get": {
                    "summary": "A recording's metadata",
                    "responses": {
                        "200": {
                            "description": "The metadata document",
                            "content": {
                                "application/json": {"schema": {"$ref": "#/components/schemas/Recording"}}
                            },
                        },
                        **_COMMON,
                    },
                },
                "delete": {
                    "summary": "Delete a recording's audio and metadata (audited; a deleted id is never re-indexed)",
                    "responses": {
                        "204": {"description": "Deleted"},
                        "501": _error("Storage kind this version cannot delete from"),
                        **_COMMON,
                    },
                },
            },
            "/api/v1/recordings/{id}/audio": {
                "parameters": [
                    _ID,
                    _q("tenant", "signed URL only: the tenant"),
                    _q("expires", "signed URL only: expiry (unix time)", {"type": "integer"}),
                    _q("sig", "signed URL only: HMAC-SHA256 signature"),
                ],
                "get": {
                    "summary": "Stream the audio (HTTP Range supported)",
                    "description": "Authorised by the API key, or by a signed URL from `POST .../audio-url` "
                    "(for `<audio src>`). One byte range per request; ETag is the SHA-256 of the file.",
                    "security": [{"apiKey": []}, {}],
                    "parameters": [
                        {
                            "name": "Range",
                            "in": "header",
                            "required": False,
                            "schema": {"type": "string"},
                            "example": "bytes=0-1023",
                        },
                        {"name": "If-Range", "in": "header", "required": False, "schema": {"type": "string"}},
                        {
                            "name": "If-None-Match",
                            "in": "header",
                            "required": False,
                            "schema": {"type": "string"},
                        },
                    ],
                    "responses": {
                        "200": {
                            "description": "The whole file",
                            "content": _AUDIO,
                        },
                        "206": {
                            "description": "The requested range",
                            "content": _AUDIO,
                        },
                        "304": {"description": "Not modified (If-None-Match)"},
                        "403": _error(
                            "Signed URL invalid or expired; or (key_unavailable) no key of the tenant opens"
                            " this encrypted recording"
                        ),
                        "416": _error("Range not satisfiable"),
                        "502": _error("(audio_corrupt) The stored object is damaged or truncated"),
                        "501": _error("Storage kind not supported by this version"),
                        "503": _error("(crypto_unavailable) No Crypto Server could unwrap the key"),
                        **_COMMON,
                    },
                },
            },
            "/api/v1/recordings/{id}/audio-url": {
                "parameters": [_ID],
                "post": {
                    "summary": "A short-lived signed URL for the audio (for browsers' <audio> elements)",
                    "responses": {
                        "200": {
                            "description": "The URL (relative) and its expiry",
                            "content": {
                                "application/json": {
                                    "schema": {
                                        "type": "object",
                                        "properties": {
                                            "url": {"type": "string"},
                                            "expires": {"type": "string", "format": "date-time"},
                                        },
                                    }
                                }
                            },
                        },
                        **_COMMON,
                    },
                },
            },
            "/api/v1/internal/recordings": {
                "post": {
                    "summary": "Index a recording (Recording Processor); idempotent by id",
                    "security": [{"internalToken": []}],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/Recording"}}
                        },
                    },
                    "responses": {
                        "201": {"description": "Created"},
                        "200": {"description": "The identical document was already indexed"},
                        "400": _error("Invalid JSON or document (error.field names the field)"),
                        "401": _error("Missing or invalid internal token"),
                        "409": _error("A different document with this id is indexed (the first is kept)"),
                        "410": _error("The recording was deleted; it is not indexed again"),
                        "413": _error("Body larger than 1 MiB"),
                    },
                }
            },
        },
        "components": {
            "securitySchemes": {
                "apiKey": {"type": "http", "scheme": "bearer", "description": "The tenant's API key"},
                "internalToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "web_services.internal_token",
                },
            },
            "schemas": {
                "Recording": _RECORDING,
                "Stream": _STREAM,
                "Page": {
                    "type": "object",
                    "required": ["items", "next"],
                    "properties": {
                        "items": {"type": "array", "items": {"$ref": "#/components/schemas/Recording"}},
                        "next": {
                            "type": ["string", "null"],
                            "description": "cursor of the next page; null on the last",
                        },
                    },
                },
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": {
                            "type": "object",
                            "required": ["status", "code", "message"],
                            "properties": {
                                "status": {"type": "integer"},
                                "code": {"type": "string"},
                                "message": {"type": "string"},
                                "field": {"type": "string"},
                            },
                        }
                    },
                },
            },
        },
    }
