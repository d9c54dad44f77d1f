"""MCP health state machine and least-loaded selection, driven with a fake clock."""

from __future__ import annotations

import pytest

from services.config import McpConfig
from services.resource_manager.pool import Health, McpPool


def make_pool(n: int = 2, failures: int = 3) -> McpPool:
    mcps = [McpConfig(name=f"mcp{i + 1}", port=5080 + 2 * i) for i in range(n)]
    return McpPool(mcps, failures_before_down=failures)


def test_unknown_mcps_get_no_sessions_until_they_answer() -> None:
    pool = make_pool()
    assert all(node.state is Health.UNKNOWN for node in pool)
    assert pool.choose() is None
    t = pool.probe_ok("mcp2", now=1.0)
    assert t is not None and (t.old, t.new) == (Health.UNKNOWN, Health.UP)
    assert pool.choose().name == "mcp2"  # type: ignore[union-attr]
    assert pool.probe_ok("mcp2", now=2.0) is None  # no transition when nothing changes


def test_down_after_n_consecutive_misses_and_up_on_the_next_answer() -> None:
    pool = make_pool(failures=3)
    pool.probe_ok("mcp1", now=0.0)
    assert pool.probe_failed("mcp1", 1.0, "timeout") is None
    assert pool.probe_failed("mcp1", 2.0, "timeout") is None
    assert pool.healthy("mcp1")  # still up: two misses are not enough
    pool.probe_ok("mcp1", now=3.0)  # an answer resets the count
    assert pool.node("mcp1").misses == 0
    for t in (4.0, 5.0):
        assert pool.probe_failed("mcp1", t, "timeout") is None
    down = pool.probe_failed("mcp1", 6.0, "timeout")
    assert down is not None and (down.old, down.new) == (Health.UP, Health.DOWN)
    assert not pool.healthy("mcp1") and pool.choose() is None
    assert pool.probe_failed("mcp1", 7.0, "timeout") is None  # already down
    up = pool.probe_ok("mcp1", now=8.0)
    assert up is not None and up.new is Health.UP and pool.node("mcp1").changed == 8.0


def test_draining_mcp_keeps_out_of_selection_without_being_down() -> None:
    pool = make_pool()
    pool.probe_ok("mcp1", 0.0)
    pool.probe_ok("mcp2", 0.0)
    t = pool.probe_draining("mcp1", 1.0)
    assert t is not None and t.new is Health.DRAINING
    assert pool.choose().name == "mcp2"  # type: ignore[union-attr]
    # A draining MCP that then stops answering goes down.
    for now in (2.0, 3.0):
        pool.probe_failed("mcp1", now, "timeout")
    assert pool.probe_failed("mcp1", 4.0, "timeout").new is Health.DOWN  # type: ignore[union-attr]


def test_least_loaded_with_reported_load() -> None:
    pool = make_pool(3)
    pool.probe_ok("mcp1", 0.0, load=5)
    pool.probe_ok("mcp2", 0.0, load=2)
    pool.probe_ok("mcp3", 0.0, load=3)
    assert pool.choose().name == "mcp2"  # type: ignore[union-attr]
    # Sessions placed since the last report count until the next report replaces them.
    pool.placed("mcp2", 1.0)
    pool.placed("mcp2", 1.1)
    assert pool.load("mcp2") == 4
    assert pool.choose().name == "mcp3"  # type: ignore[union-attr]
    pool.probe_ok("mcp2", 2.0, load=1)
    assert pool.load("mcp2") == 1


def test_without_reports_the_rms_own_dialog_count_is_the_load() -> None:
    pool = make_pool()
    pool.probe_ok("mcp1", 0.0)
    pool.probe_ok("mcp2", 0.0)
    assert pool.choose(active={"mcp1": 1}).name == "mcp2"  # type: ignore[union-attr]
    assert pool.choose(active={"mcp2": 1}).name == "mcp1"  # type: ignore[union-attr]


def test_ties_go_round_robin_by_last_placement() -> None:
    pool = make_pool()
    pool.probe_ok("mcp1", 0.0)
    pool.probe_ok("mcp2", 0.0)
    first = pool.choose()
    assert first is not None and first.name == "mcp1"  # configuration order
    pool.placed("mcp1", 1.0)
    pool.probe_ok("mcp1", 1.5, load=0)
    pool.probe_ok("mcp2", 1.5, load=0)
    assert pool.choose().name == "mcp2"  # type: ignore[union-attr]


def test_affinity_preference_exclusion_and_failover() -> None:
    pool = make_pool()
    pool.probe_ok("mcp1", 0.0, load=10)
    pool.probe_ok("mcp2", 0.0, load=0)
    assert pool.choose(prefer="mcp1").name == "mcp1"  # type: ignore[union-attr]
    assert pool.choose(prefer="mcp1", exclude={"mcp1"}).name == "mcp2"  # type: ignore[union-attr]
    for now in (1.0, 2.0, 3.0):
        pool.probe_failed("mcp1", now, "timeout")
    assert pool.choose(prefer="mcp1").name == "mcp2"  # type: ignore[union-attr]
    assert pool.choose(exclude={"mcp2"}) is None
    assert pool.choose(prefer="unknown").name == "mcp2"  # type: ignore[union-attr]


def test_node_addressing() -> None:
    pool = McpPool([McpConfig(name="v6", host="::1", port=5090)])
    node = pool.node("v6")
    assert node.uri == "sip:record@[::1]:5090" and node.address == ("::1", 5090)
    assert pool.by_address("::1", 5090) is node
    assert node.to_dict()["state"] == "unknown"
    with pytest.raises(ValueError):
        McpPool([], failures_before_down=0)
