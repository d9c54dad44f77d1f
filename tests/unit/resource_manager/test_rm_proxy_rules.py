"""The proxy's pure rules: tenant identification, X-CV-Profile, Record-Route, Max-Forwards, routing."""

from __future__ import annotations

import pytest

from services.config import ClusterConfig, IvrProfile, ResourceManagerConfig, Tenant
from services.mcp import xcv
from services.resource_manager.proxy import (
    LocalAddress,
    ProxyError,
    decrement_max_forwards,
    identify_tenant,
    next_hop,
    pop_top_via,
    prepare_initial_invite,
    stateless_branch,
    strip_own_route,
)
from services.sip.message import Request, Response

ME = LocalAddress("127.0.0.1", 5070, frozenset({"localhost"}))


def config() -> ClusterConfig:
    return ClusterConfig(
        resource_manager=ResourceManagerConfig(),
        tenants=[
            Tenant(id="acme", api_key="k" * 16, domains=["acme.example"], profile=IvrProfile(channels=2)),
            Tenant(
                id="globex",
                api_key="g" * 16,
                domains=["globex.example"],
                profile=IvrProfile(name="mono", channels=1),
            ),
        ],
    )


def invite(uri: str = "sip:record@127.0.0.1:5070", *, to: str = "sip:record@127.0.0.1", extra=()) -> Request:
    return Request(
        "INVITE",
        uri,
        [
            ("Via", "SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK-abc;rport"),
            ("Max-Forwards", "70"),
            ("From", "<sip:sipserver@127.0.0.1>;tag=f1"),
            ("To", f"<{to}>"),
            ("Call-ID", "call-1"),
            ("CSeq", "1 INVITE"),
            *extra,
        ],
    )


def test_tenant_from_header() -> None:
    assert identify_tenant(config(), invite(extra=[("X-CV-Tenant", "globex")])).id == "globex"


def test_unknown_tenant_header_is_forbidden() -> None:
    with pytest.raises(ProxyError) as err:
        identify_tenant(config(), invite(extra=[("X-CV-Tenant", "initech")]))
    assert err.value.status == 403 and "initech" in err.value.reason


def test_tenant_from_request_uri_or_to_domain() -> None:
    assert identify_tenant(config(), invite("sip:record@globex.example")).id == "globex"
    assert identify_tenant(config(), invite(to="sip:x@globex.example")).id == "globex"
    # No tenant lists the domain: the first tenant (ClusterConfig.tenant_for_domain).
    assert identify_tenant(config(), invite()).id == "acme"


def test_no_tenant_at_all_is_404() -> None:
    with pytest.raises(ProxyError) as err:
        identify_tenant(ClusterConfig(), invite())
    assert err.value.status == 404


def test_prepared_invite_carries_profile_record_route_and_one_hop_less() -> None:
    cfg = config()
    req = invite(
        extra=[("X-CV-Tenant", "globex"), ("X-CV-Profile", "forged"), ("Route", "<sip:127.0.0.1:5070;lr>")]
    )
    fwd = prepare_initial_invite(req, tenant=cfg.tenants[1], me=ME, transport="udp")
    assert fwd.max_forwards == 69
    assert fwd.headers.get_all("Record-Route") == ["<sip:127.0.0.1:5070;lr>"]
    assert "Route" not in fwd.headers  # our own Route is consumed (RFC 3261 16.4)
    profile = xcv.decode_profile(fwd.headers.get("X-CV-Profile") or "")
    assert profile == IvrProfile(name="mono", channels=1)
    assert req.headers.get("X-CV-Profile") == "forged"  # the original is untouched
    tcp = prepare_initial_invite(invite(), tenant=cfg.tenants[0], me=ME, transport="tcp")
    assert tcp.headers.get("Record-Route") == "<sip:127.0.0.1:5070;transport=tcp;lr>"
    assert tcp.headers.get("X-CV-Tenant") == "acme"  # filled in when found by domain


def test_max_forwards() -> None:
    req = invite()
    req.headers.set("Max-Forwards", "1")
    decrement_max_forwards(req)
    assert req.max_forwards == 0
    with pytest.raises(ProxyError) as err:
        decrement_max_forwards(req)
    assert err.value.status == 483
    req.headers.remove("Max-Forwards")
    decrement_max_forwards(req)
    assert req.max_forwards == 70


def test_loose_routing_to_the_request_uri_or_next_route() -> None:
    bye = invite("sip:mcp@127.0.0.1:5080")
    bye.method = "BYE"
    bye.headers.add("Route", "<sip:127.0.0.1:5070;lr>")
    strip_own_route(bye, ME)
    assert next_hop(bye) == ("127.0.0.1", 5080, "udp")
    bye.headers.add("Route", "<sip:10.0.0.9:5999;transport=tcp;lr>")
    assert next_hop(bye) == ("10.0.0.9", 5999, "tcp")
    # A Route naming another proxy is not ours to remove.
    strip_own_route(bye, ME)
    assert bye.headers.get("Route") == "<sip:10.0.0.9:5999;transport=tcp;lr>"


def test_strict_router_rewrite_is_undone() -> None:
    req = invite("sip:127.0.0.1:5070;lr")
    req.headers.add("Route", "<sip:mcp@127.0.0.1:5080>")
    strip_own_route(req, ME)
    assert str(req.uri) == "sip:mcp@127.0.0.1:5080" and "Route" not in req.headers


def test_local_address_matching() -> None:
    from services.sip.uri import SipUri

    assert ME.matches(SipUri.parse("sip:record@127.0.0.1:5070"))
    assert ME.matches(SipUri.parse("sip:localhost:5070;lr"))
    assert not ME.matches(SipUri.parse("sip:record@127.0.0.1"))  # port 5060
    assert not ME.matches(SipUri.parse("sip:127.0.0.1:5080"))


def test_pop_top_via_and_stateless_branch() -> None:
    resp = Response(
        200, headers=[("Via", "SIP/2.0/UDP a:1;branch=z9hG4bK1, SIP/2.0/UDP b:2;branch=z9hG4bK2")]
    )
    pop_top_via(resp)
    assert resp.headers.get_all("Via") == ["SIP/2.0/UDP b:2;branch=z9hG4bK2"]
    ack = invite()
    ack.method = "ACK"
    assert stateless_branch(ack) == stateless_branch(ack.copy())
    assert stateless_branch(ack).startswith("z9hG4bK")


def test_refusal_is_told_from_a_transport_error() -> None:
    from services.resource_manager.proxy import is_refusal

    assert is_refusal(Response(503, headers=[("Retry-After", "5")]))
    assert is_refusal(Response(503, headers=[("X-CV-Load", "3")]))
    assert not is_refusal(Response(503))  # the synthetic 503 of a transport error
    assert not is_refusal(Response(500, headers=[("Retry-After", "5")]))
