"""SipUri, NameAddr, Via and CSeq parsing and round trips (RFC 3261 19.1, 20, 25.1)."""

from __future__ import annotations

import pytest

from services.sip.errors import SipParseError
from services.sip.headers import CSeq, Via
from services.sip.uri import NameAddr, SipUri


@pytest.mark.parametrize(
    "text",
    [
        "sip:alice@atlanta.com",
        "sip:alice:secretword@atlanta.com;transport=tcp",
        "sips:alice@atlanta.com?subject=project%20x&priority=urgent",
        "sip:+1-212-555-1212:1234@gateway.com;user=phone",
        "sips:1212@gateway.com",
        "sip:alice@192.0.2.4",
        "sip:atlanta.com;method=REGISTER?to=alice%40atlanta.com",
        "sip:alice;day=tuesday@atlanta.com",
        "sip:bob@[2001:db8::1]:5060;transport=tcp",
        "sip:[2001:db8::10]",
        "sip:example.com:5070;lr",
        "tel:+1-201-555-0123",
        "tel:7042;phone-context=example.com",
        "sip:sips%3Auser%40example.com@example.net",
    ],
)
def test_uri_round_trip(text: str) -> None:
    uri = SipUri.parse(text)
    assert str(uri) == text
    assert SipUri.parse(str(uri)) == uri


def test_uri_fields() -> None:
    uri = SipUri.parse("sips:alice:pw@[2001:db8::1]:5061;transport=TCP;lr;maddr=239.255.255.1?h=v&x=y")
    assert uri.scheme == "sips"
    assert uri.user == "alice"
    assert uri.password == "pw"
    assert uri.host == "2001:db8::1"
    assert uri.port == 5061
    assert uri.params == {"transport": "TCP", "lr": None, "maddr": "239.255.255.1"}
    assert uri.headers == {"h": "v", "x": "y"}
    assert uri.transport == "tcp"
    assert uri.secure
    assert SipUri.parse("sip:a@b").transport == "udp"


def test_uri_escapes_are_decoded_and_reencoded() -> None:
    uri = SipUri.parse("sip:%75se%72@example.com")
    assert uri.user == "user"
    assert str(uri) == "sip:user@example.com"
    uri = SipUri.parse("sip:sips%3Auser%40example.com@example.net")
    assert uri.user == "sips:user@example.com"
    assert uri.host == "example.net"
    uri = SipUri.parse("sip:null-%00-null@example.com")
    assert uri.user == "null-\x00-null"
    assert str(uri) == "sip:null-%00-null@example.com"
    # ';' is user-unreserved: the user part can carry it (RFC 4475 3.1.1.9)
    uri = SipUri.parse("sip:user;par=u%40example.net@example.com")
    assert uri.user == "user;par=u@example.net"
    assert uri.params == {}


def test_tel_uri() -> None:
    uri = SipUri.parse("tel:+1-201-555-0123;phone-context=example.com")
    assert uri.scheme == "tel"
    assert uri.user == "+1-201-555-0123"
    assert uri.host == ""
    assert uri.params == {"phone-context": "example.com"}


def test_uri_aor_and_copy() -> None:
    uri = SipUri.parse("sip:Alice@Example.COM:5070;transport=tcp")
    assert uri.aor == "sip:Alice@example.com"
    clone = uri.copy()
    clone.params["lr"] = None
    assert "lr" not in uri.params


@pytest.mark.parametrize(
    ("text", "status"),
    [
        ("http://example.com/", 416),
        ("nobodyKnowsThisScheme:totallyopaquecontent", 416),
        ("soap.beep://192.0.2.103:3002", 416),
        ("<sip:user@example.com>", 400),
        ("sip:user@example.com:99999", 400),
        ("sip:user@exa mple.com", 400),
        ("sip:user@[2001:db8::1", 400),
        ("sip:user@[not:an:address]", 400),
        ("sip:%ZZ@example.com", 400),
        ("sip:a@b;;lr", 400),
        ("sip:", 400),
        ("sip:@example.com", 400),
        ("example.com", 400),
        ("", 400),
    ],
)
def test_uri_errors(text: str, status: int) -> None:
    with pytest.raises(SipParseError) as info:
        SipUri.parse(text)
    assert info.value.status == status


def test_name_addr_forms() -> None:
    na = NameAddr.parse('"J Rosenberg \\\\\\"" <sip:jdrosen@example.com> ; tag = 98asjd8')
    assert na.display == 'J Rosenberg \\"'
    assert na.uri.user == "jdrosen"
    assert na.tag == "98asjd8"
    na = NameAddr.parse("caller<sip:caller@example.com>;tag=323")
    assert na.display == "caller"
    assert na.tag == "323"
    # addr-spec: the parameters belong to the header, not to the URI (RFC 3261 20.10)
    na = NameAddr.parse("sip:vivekg@chair-dnrc.example.com ;   tag    = 1918181833n")
    assert na.display is None
    assert na.uri.params == {}
    assert na.tag == "1918181833n"
    na = NameAddr.parse('<sip:a@b;lr>;expires=60;+sip.instance="<urn:uuid:1>"')
    assert na.uri.params == {"lr": None}
    assert na.params == {"expires": "60", "+sip.instance": '"<urn:uuid:1>"'}
    assert str(na) == '<sip:a@b;lr>;expires=60;+sip.instance="<urn:uuid:1>"'
    na = NameAddr.parse("Alice   Smith <sip:alice@example.com>")
    assert na.display == "Alice Smith"
    assert str(na) == '"Alice Smith" <sip:alice@example.com>'
    assert NameAddr.parse(str(na)) == na


@pytest.mark.parametrize(
    "text",
    [
        '"Mr. J. User <sip:j.user@example.com>',  # unterminated quote (RFC 4475 3.1.2.6)
        "sip:user@example.com?Route=%3Csip:sip.example.com%3E",  # addr-spec with '?' (3.1.2.13)
        '"Watson, Thomas" < sip:t.watson@example.org >',  # LWS inside <> (3.1.2.14)
        "Bell, Alexander <sip:a.g.bell@example.com>;tag=43",  # non-token display name (3.1.2.15)
        "<sip:joe@example.org>;;;;",
        "<sip:joe@example.org> garbage",
        "<sip:joe@example.org",
        "",
    ],
)
def test_name_addr_errors(text: str) -> None:
    with pytest.raises(SipParseError) as info:
        NameAddr.parse(text)
    assert info.value.status == 400


def test_via() -> None:
    via = Via.parse("SIP  /   2.0 /UDP     192.0.2.2;branch=390skdjuw")
    assert (via.transport, via.host, via.port, via.branch) == ("UDP", "192.0.2.2", None, "390skdjuw")
    via = Via.parse("SIP/2.0/tcp [2001:db8::9]:5061 ; branch = z9hG4bK1 ; received=[2001:db8::8];rport=5070")
    assert via.transport == "TCP"
    assert via.host == "2001:db8::9"
    assert via.port == 5061
    assert via.received == "[2001:db8::8]"
    assert via.rport == 5070
    assert str(via) == "SIP/2.0/TCP [2001:db8::9]:5061;branch=z9hG4bK1;received=[2001:db8::8];rport=5070"
    assert Via.parse(str(via)) == via
    assert Via.parse("SIP/2.0/UDP h;rport").rport == ""
    assert Via.parse("SIP/2.0/UDP h").rport is None
    assert Via.parse("SIP/2.0/UDP h : 5080").port == 5080


@pytest.mark.parametrize(
    "text",
    [
        "SIP/2.0/UDP",
        "SIP/2.0 UDP host",
        "SIP/3.0/UDP host",
        "SIP/2.0/UDP 192.0.2.15;;",
        "SIP/2.0/UDP h:abc",
        "",
    ],
)
def test_via_errors(text: str) -> None:
    with pytest.raises(SipParseError):
        Via.parse(text)


def test_cseq() -> None:
    assert CSeq.parse("0009\tINVITE") == CSeq(9, "INVITE")
    assert str(CSeq(3, "BYE")) == "3 BYE"
    for bad in ("INVITE", "1", "36893488147419103232 REGISTER", "2147483648 INVITE", "-1 BYE", "1 IN VITE"):
        with pytest.raises(SipParseError):
            CSeq.parse(bad)
    assert CSeq.parse("2147483647 ACK").seq == 2**31 - 1
