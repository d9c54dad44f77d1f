"""The MCP's watch over its media engine's loss counters (services/mcp/daemon.py)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

import rtp_core
from services.mcp import daemon
from services.mcp.daemon import EngineWatch


def test_reports_what_grew_since_the_last_look() -> None:
    w = EngineWatch()
    t0 = [{"ring_drops": 0, "ring_rejected": 0, "events_dropped": 0}] * 2
    assert w.check(t0) == []
    grown = [
        {"ring_drops": 5, "ring_rejected": 1, "events_dropped": 3},
        {"ring_drops": 2, "ring_rejected": 0, "events_dropped": 3},
    ]
    lines = w.check(grown)
    assert len(lines) == 3
    assert lines[0].startswith("7 packet(s) dropped by the kernel")
    assert lines[1].startswith("1 packet(s) with a bad IPv4 header")
    assert lines[2].startswith("3 engine event(s) lost")  # engine-wide: not summed over threads
    assert w.check(grown) == []
    assert w.check([{"ring_drops": 9, "events_dropped": 3}, {"ring_drops": 2}]) == [
        "4 " + EngineWatch.COUNTERS["ring_drops"]
    ]


def test_the_engine_reports_every_counter_watched() -> None:
    with rtp_core.Engine(port_min=31000, port_max=31099, threads=2) as e:
        for thread in e.loop_stats():
            assert set(EngineWatch.COUNTERS) <= set(thread)


async def test_the_watch_logs_growth_and_stops_quietly_when_the_engine_cannot_report(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Engine:
        def __init__(self) -> None:
            self.reads = 0

        def loop_stats(self) -> list[dict[str, Any]]:
            self.reads += 1
            if self.reads == 3:
                raise ValueError("the engine is closed")
            return [{"ring_drops": 4 * (self.reads - 1), "ring_rejected": 0, "events_dropped": 0}]

    caplog.set_level(logging.WARNING, logger="callvault.mcp")
    await asyncio.wait_for(daemon._watch_engine(Engine(), "mcp9", interval=0.01), 2)
    assert any(
        "mcp9 media engine: 4 packet(s) dropped by the kernel" in r.getMessage() for r in caplog.records
    )
    assert any("cannot be read" in r.getMessage() for r in caplog.records)
