"""The SIP Server with two RMs (active/active, docs/HA.md): new bridges in turn, a failed RM tried
last, a recording dialog's route moved off an RM that stopped answering, and the Reason that tells
"MCP lost" from any other end of the bridge."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from services.config import ClusterConfig, SipServerConfig
from services.sip.message import Request
from services.sip_server.b2bua import B2BUA, mcp_lost
from services.sip_server.call import Leg

RM1, RM2 = ("127.0.0.1", 5070), ("127.0.0.1", 5072)


def b2bua(rms: list[str]) -> B2BUA:
    config = ClusterConfig(sip_server=SipServerConfig(resource_managers=rms))
    endpoint: Any = SimpleNamespace(host="127.0.0.1", port=5060)
    return B2BUA(config, endpoint, registrar=None, challenger=None)  # type: ignore[arg-type]


def test_one_rm_by_default_and_the_list_when_given() -> None:
    assert b2bua([]).rms == [RM1]
    assert b2bua(["127.0.0.1:5070", "127.0.0.1:5072"]).rms == [RM1, RM2]


def test_rms_in_turn_and_a_failed_one_last() -> None:
    b = b2bua(["127.0.0.1:5070", "127.0.0.1:5072"])
    firsts = [b._rm_order()[0] for _ in range(4)]
    assert sorted(firsts) == [RM1, RM1, RM2, RM2]
    b._rm_failed_until[RM1] = float("inf")
    assert [b._rm_order() for _ in range(2)] == [[RM2, RM1], [RM2, RM1]]


def test_route_moves_off_a_dead_rm_only() -> None:
    b = b2bua(["127.0.0.1:5070", "127.0.0.1:5072"])
    dialog: Any = SimpleNamespace(route_set=["<sip:127.0.0.1:5070;lr>"], call_id="c1")
    leg = Leg("rec", dialog=dialog)
    assert not b._reroute(leg, ("127.0.0.1", 9999))  # not an RM of ours
    assert not b._reroute(leg, RM2)  # not this dialog's first hop
    assert b._reroute(leg, RM1)
    assert dialog.route_set == ["<sip:127.0.0.1:5072;lr>"]
    assert b._rm_failed_until[RM1] > 0
    lone = b2bua([])
    assert not lone._reroute(
        Leg("rec", dialog=SimpleNamespace(route_set=["<sip:127.0.0.1:5070;lr>"], call_id="c")), RM1
    )  # type: ignore[arg-type]


def test_mcp_lost_reason() -> None:
    assert mcp_lost(Request("BYE", "sip:x@h", [("Reason", 'SIP;cause=503;text="MCP down"')]))
    assert not mcp_lost(Request("BYE", "sip:x@h", [("Reason", 'SIP;cause=200;text="no ACK"')]))
