"""An MCP that stops answering: the RM ends its recording dialogs towards the SIP Server (BYE with
Reason cause 503, from the MCP's side of the dialog) and at the MCP (should it only be slow), and
places the session's next part on another MCP (issue 5, MCP failure)."""

from __future__ import annotations

from services.resource_manager.affinity import DialogRef
from services.resource_manager.pool import McpNode
from services.resource_manager.proxy import LocalAddress, mcp_down_bye, mcp_side_bye
from services.sip.message import Request
from services.sip_server.b2bua import mcp_lost
from tests.unit.resource_manager.test_rm_proxy_loopback import Rig, rig, until  # noqa: F401

DIALOG = DialogRef(
    "c1@h", "ss-tag", "mcp1", to_tag="mcp-tag", confirmed=True, contact="sip:ss@127.0.0.1:5060"
)


def test_bye_towards_the_sip_server_plays_the_mcp_side() -> None:
    bye, dest = mcp_down_bye(DIALOG, LocalAddress("127.0.0.1", 5070), 1_000_000)
    assert dest == ("127.0.0.1", 5060, "udp")
    assert bye.method == "BYE" and str(bye.uri) == "sip:ss@127.0.0.1:5060"
    assert bye.from_.tag == "mcp-tag" and bye.to.tag == "ss-tag" and bye.call_id == "c1@h"
    assert bye.cseq.seq == 1_000_000
    assert mcp_lost(bye)


def test_bye_towards_the_mcp_plays_the_sip_server_side() -> None:
    bye = mcp_side_bye(DIALOG, McpNode("mcp1", "127.0.0.1", 5080), 7)
    assert str(bye.uri) == "sip:record@127.0.0.1:5080"
    assert bye.from_.tag == "ss-tag" and bye.to.tag == "mcp-tag"


def test_unestablished_dialog_has_no_bye() -> None:
    try:
        mcp_down_bye(DialogRef("c2@h", "t", "mcp1"), LocalAddress("127.0.0.1", 5070), 1)
    except ValueError as exc:
        assert "not established" in str(exc)
    else:
        raise AssertionError("a BYE was built for a dialog without To tag")


def test_only_cause_503_means_mcp_lost() -> None:
    def bye(reason: str | None) -> Request:
        headers = [("Reason", reason)] if reason else []
        return Request("BYE", "sip:x@h", headers)

    assert mcp_lost(bye('SIP;cause=503;text="MCP down"'))
    assert mcp_lost(bye("sip ; text=x; cause=503"))
    assert not mcp_lost(bye('SIP;cause=200;text="MCP shutting down"'))
    assert not mcp_lost(bye("Q.850;cause=503"))
    assert not mcp_lost(bye(None))


async def test_dead_mcp_dialogs_are_ended_and_the_next_part_moves(rig: Rig) -> None:  # noqa: F811
    await rig.wait_healthy(2)
    response, dialog, _ = await rig.call(rig.invite("sX"))
    assert response.status == 200 and dialog is not None
    first = "mcp1" if rig.mcps["mcp1"].invites else "mcp2"
    other = "mcp2" if first == "mcp1" else "mcp1"
    rig.mcps[first].options_down = True
    await until(lambda: any(r.method == "BYE" for r in rig.uac_requests), timeout=5)
    (bye,) = [r for r in rig.uac_requests if r.method == "BYE"]
    assert bye.call_id == dialog.call_id and bye.to.tag == dialog.local_tag
    assert bye.from_.tag == dialog.remote_tag and mcp_lost(bye)
    # The "dead" MCP was only silent to OPTIONS: it gets a BYE as well.
    await until(lambda: any(r.method == "BYE" for r in rig.mcps[first].others))
    # The session's next part goes to the healthy MCP.
    response, _, _ = await rig.call(rig.invite("sX", extra=[]))
    assert response.status == 200 and len(rig.mcps[other].invites) == 1


def test_peer_report_marks_down_until_a_probe_answers() -> None:
    from services.config import McpConfig
    from services.resource_manager.pool import Health, McpPool

    pool = McpPool([McpConfig(name="mcp1")], failures_before_down=3)
    assert pool.probe_ok("mcp1", 1.0) is not None
    t = pool.mark_down("mcp1", 2.0, "reported down by rm1")
    assert t is not None and t.new is Health.DOWN and not pool.healthy("mcp1")
    assert pool.mark_down("mcp1", 2.5, "again") is None
    assert pool.probe_ok("mcp1", 3.0) is not None and pool.healthy("mcp1")
