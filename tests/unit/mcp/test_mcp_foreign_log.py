"""The MCP warns about the datagrams rtp_core's strict source dropped as foreign (RTP injection)."""

from __future__ import annotations

import logging

import pytest

from services.mcp import server as mcp_server


def test_foreign_datagrams_are_warned_per_leg(caplog: pytest.LogCaptureFixture) -> None:
    stats = {"legs": [{"invalid": 0, "foreign": 0}, {"invalid": 2, "foreign": 12}]}
    with caplog.at_level(logging.WARNING, logger=mcp_server.__name__):
        mcp_server._log_invalid("r1", stats)
        mcp_server._log_invalid("r2", None)  # a failed close gives no stats: nothing to say
        mcp_server._log_invalid("r3", {"legs": [{"packets": 5}]})  # an older engine: no counts
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert "recording r1: 2 invalid datagram(s) on the callee leg" in lines[0]
    assert lines[1].startswith("recording r1: 12 datagram(s) from a foreign source on the callee leg")
