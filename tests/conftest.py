"""Shared pytest configuration.

Unit and integration tests run on both event loops the daemons may use: the standard asyncio loop
and uvloop (STYLE.md: "tests run on both event loops"). System tests drive external processes, so
the loop of the test process itself does not matter there and they run once, on asyncio's loop.
"""

from __future__ import annotations

import asyncio

import pytest
import uvloop


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item):
    if "tests/system/" in item.nodeid:
        return {"asyncio": asyncio.new_event_loop}
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
