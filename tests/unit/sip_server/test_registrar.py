"""Registrar (RFC 3261 10.3): bindings, expiry, digest auth, with a fake clock."""

from __future__ import annotations

import logging

import pytest

from services import config as config_mod
from services.sip.auth import DigestChallenger, build_authorization, parse_digest
from services.sip.message import Request, Response, parse_message
from services.sip_server.registrar import BAD_CREDENTIALS, BindingStore, Registrar

T0 = 1_700_000_000.0
SOURCE = ("192.0.2.10", 40000)


def make_config(**sip_server: object) -> config_mod.ClusterConfig:
    return config_mod.from_dict(
        {
            "sip_server": {"realm": "callvault", "min_expires": 60, "max_expires": 3600, **sip_server},
            "tenants": [
                {
                    "id": "acme",
                    "api_key": "acme-key-0123456789",
                    "domains": ["acme.test"],
                    "users": [
                        {"extension": "1001", "password": "secret1"},
                        {"extension": "1002", "password": "secret2"},
                    ],
                },
                {
                    "id": "other",
                    "api_key": "other-key-0123456789",
                    "domains": ["other.test"],
                    "users": [{"extension": "1001", "password": "othersecret"}],
                },
            ],
        },
        environ={},
    )


class Phone:
    """Builds REGISTERs like a UA: same Call-ID, CSeq counting up, answers challenges."""

    def __init__(self, user: str, password: str, domain: str = "acme.test", call_id: str = "reg-1") -> None:
        self.user, self.password, self.domain, self.call_id = user, password, domain, call_id
        self.cseq = 0

    def register(
        self,
        contacts: list[str] | None = None,
        *,
        expires: int | None = None,
        challenge: Response | None = None,
        password: str | None = None,
        username: str | None = None,
    ) -> Request:
        self.cseq += 1
        lines = [
            f"REGISTER sip:{self.domain} SIP/2.0",
            f"Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK{self.cseq}x;rport",
            f"From: <sip:{self.user}@{self.domain}>;tag=ft1",
            f"To: <sip:{self.user}@{self.domain}>",
            f"Call-ID: {self.call_id}",
            f"CSeq: {self.cseq} REGISTER",
            "Max-Forwards: 70",
        ]
        for c in contacts if contacts is not None else [f"<sip:{self.user}@192.0.2.10:5060>"]:
            lines.append(f"Contact: {c}")
        if expires is not None:
            lines.append(f"Expires: {expires}")
        if challenge is not None:
            value = challenge.headers.get_all("WWW-Authenticate")[0]
            auth = build_authorization(
                value,
                method="REGISTER",
                uri=f"sip:{self.domain}",
                username=username or self.user,
                password=password or self.password,
            )
            lines.append(f"Authorization: {auth}")
        data = ("\r\n".join(lines) + "\r\nContent-Length: 0\r\n\r\n").encode()
        msg = parse_message(data)
        assert isinstance(msg, Request)
        return msg


@pytest.fixture
def registrar() -> Registrar:
    return Registrar(make_config(), DigestChallenger("callvault", b"k" * 16))


def registered(registrar: Registrar, phone: Phone, now: float = T0, **kw: object) -> Response:
    """REGISTER, answer the 401, return the final response."""
    first = registrar.handle(phone.register(**kw), SOURCE, "udp", now)  # type: ignore[arg-type]
    assert first.status == 401
    return registrar.handle(phone.register(challenge=first, **kw), SOURCE, "udp", now)  # type: ignore[arg-type]


def test_challenge_offers_sha256_then_md5(registrar: Registrar) -> None:
    resp = registrar.handle(Phone("1001", "secret1").register(), SOURCE, "udp", T0)
    assert resp.status == 401
    algorithms = [parse_digest(v).get("algorithm") for v in resp.headers.get_all("WWW-Authenticate")]
    assert algorithms == ["SHA-256", "MD5"]
    assert all(parse_digest(v)["realm"] == "callvault" for v in resp.headers.get_all("WWW-Authenticate"))


def test_register_ok_lists_binding_with_expires(registrar: Registrar) -> None:
    resp = registered(registrar, Phone("1001", "secret1"), expires=600)
    assert resp.status == 200
    contacts = resp.headers.get_all("Contact")
    assert contacts == ["<sip:1001@192.0.2.10:5060>;expires=600"]
    [binding] = registrar.store.lookup("acme", "1001", T0)
    assert binding.destination() == ("192.0.2.10", 40000, "udp")  # the source, not the contact
    assert binding.uri.port == 5060


def test_md5_credentials_accepted(registrar: Registrar) -> None:
    phone = Phone("1001", "secret1")
    first = registrar.handle(phone.register(), SOURCE, "udp", T0)
    md5 = next(v for v in first.headers.get_all("WWW-Authenticate") if "MD5" in v)
    first.headers.set("WWW-Authenticate", md5)
    resp = registrar.handle(phone.register(challenge=first), SOURCE, "udp", T0)
    assert resp.status == 200


def test_wrong_password_is_403(registrar: Registrar) -> None:
    phone = Phone("1001", "secret1")
    first = registrar.handle(phone.register(), SOURCE, "udp", T0)
    resp = registrar.handle(phone.register(challenge=first, password="nope"), SOURCE, "udp", T0)
    assert resp.status == 403
    assert registrar.store.count() == 0


def test_third_party_registration_refused(registrar: Registrar) -> None:
    phone = Phone("1001", "secret2")
    first = registrar.handle(phone.register(), SOURCE, "udp", T0)
    resp = registrar.handle(phone.register(challenge=first, username="1002"), SOURCE, "udp", T0)
    assert resp.status == 403


def test_unknown_user_is_challenged_and_refused_like_a_wrong_password(
    registrar: Registrar, caplog: pytest.LogCaptureFixture
) -> None:
    """No enumeration of extensions: an unknown one gets the same 401 and then the same 403 as a
    known one with a wrong password; only the log says which it was."""
    caplog.set_level(logging.INFO, "services.sip_server.registrar")
    known, unknown = Phone("1001", "secret1"), Phone("9999", "secret1")
    answers = []
    for phone, password in ((known, "nope"), (unknown, "secret1")):
        first = registrar.handle(phone.register(), SOURCE, "udp", T0)
        assert first.status == 401
        algorithms = [parse_digest(v).get("algorithm") for v in first.headers.get_all("WWW-Authenticate")]
        assert algorithms == ["SHA-256", "MD5"]
        second = registrar.handle(phone.register(challenge=first, password=password), SOURCE, "udp", T0)
        answers.append((second.status, second.reason, sorted(n for n, _ in second.headers.items())))
    assert answers[0] == answers[1] == (403, BAD_CREDENTIALS, answers[0][2])
    assert registrar.store.count() == 0
    messages = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert messages == [
        "REGISTER from 1001 refused for tenant acme: wrong password (source 192.0.2.10:40000)",
        "REGISTER from 9999 refused for tenant acme: unknown user (source 192.0.2.10:40000)",
    ]


def test_unknown_user_with_an_expired_nonce_is_refused_not_rechallenged(registrar: Registrar) -> None:
    """A stale nonce is only reported for credentials that were right (RFC 7616 3.3), so an unknown
    user gets 403 there too, like a wrong password, rather than a telling 401 stale=true."""
    for phone, password in ((Phone("1001", "secret1"), "nope"), (Phone("9999", "x"), "x")):
        first = registrar.handle(phone.register(), SOURCE, "udp", T0)
        late = registrar.handle(
            phone.register(challenge=first, password=password), SOURCE, "udp", T0 + 10_000
        )
        assert (late.status, late.reason) == (403, BAD_CREDENTIALS)


def test_registering_an_unknown_extension_with_valid_credentials_is_third_party(registrar: Registrar) -> None:
    phone = Phone("9999", "secret1")
    first = registrar.handle(phone.register(), SOURCE, "udp", T0)
    resp = registrar.handle(phone.register(challenge=first, username="1001"), SOURCE, "udp", T0)
    assert resp.status == 403 and "AOR" in resp.reason
    assert registrar.store.count() == 0


def test_tenant_by_domain(registrar: Registrar) -> None:
    # 1001 of tenant "other" has its own password and its own bindings.
    phone = Phone("1001", "othersecret", domain="other.test")
    assert registered(registrar, phone).status == 200
    assert registrar.store.lookup("other", "1001", T0)
    assert not registrar.store.lookup("acme", "1001", T0)


def test_stale_nonce_rechallenged_with_stale_true(registrar: Registrar) -> None:
    phone = Phone("1001", "secret1")
    first = registrar.handle(phone.register(), SOURCE, "udp", T0)
    resp = registrar.handle(phone.register(challenge=first), SOURCE, "udp", T0 + 10_000)
    assert resp.status == 401
    assert "stale=true" in resp.headers.get_all("WWW-Authenticate")[0]


def test_interval_too_brief_423(registrar: Registrar) -> None:
    resp = registered_any(registrar, Phone("1001", "secret1"), expires=30)
    assert resp.status == 423
    assert resp.headers.get("Min-Expires") == "60"


def registered_any(registrar: Registrar, phone: Phone, **kw: object) -> Response:
    first = registrar.handle(phone.register(**kw), SOURCE, "udp", T0)  # type: ignore[arg-type]
    return registrar.handle(phone.register(challenge=first, **kw), SOURCE, "udp", T0)  # type: ignore[arg-type]


def test_expires_clamped_to_max(registrar: Registrar) -> None:
    resp = registered(registrar, Phone("1001", "secret1"), expires=99999)
    assert resp.headers.get_all("Contact") == ["<sip:1001@192.0.2.10:5060>;expires=3600"]


def test_binding_expires_with_the_clock(registrar: Registrar) -> None:
    registered(registrar, Phone("1001", "secret1"), expires=120)
    assert registrar.store.lookup("acme", "1001", T0 + 119)
    assert not registrar.store.lookup("acme", "1001", T0 + 121)
    assert registrar.store.purge(T0 + 121) == 1
    assert registrar.store.count() == 0


def test_multiple_contacts_with_q_and_expires(registrar: Registrar) -> None:
    phone = Phone("1001", "secret1")
    resp = registered(
        registrar,
        phone,
        contacts=["<sip:1001@192.0.2.10:5060>;q=0.5", "<sip:1001@192.0.2.11:5070>;q=0.9;expires=300"],
        expires=900,
    )
    assert resp.status == 200
    assert sorted(resp.headers.get_all("Contact")) == [
        "<sip:1001@192.0.2.10:5060>;expires=900;q=0.5",
        "<sip:1001@192.0.2.11:5070>;expires=300;q=0.9",
    ]
    best = registrar.store.lookup("acme", "1001", T0)
    assert [b.uri.host for b in best] == ["192.0.2.11", "192.0.2.10"]  # highest q first


def test_second_device_adds_binding_and_query_lists_all(registrar: Registrar) -> None:
    registered(registrar, Phone("1001", "secret1", call_id="dev-a"), contacts=["<sip:1001@192.0.2.10>"])
    registered(
        registrar, Phone("1001", "secret1", call_id="dev-b"), contacts=["<sip:1001@192.0.2.20>"], now=T0 + 5
    )
    query = registered(registrar, Phone("1001", "secret1", call_id="q"), contacts=[], now=T0 + 10)
    assert query.status == 200
    assert len(query.headers.get_all("Contact")) == 2
    # most recent first among equal q
    assert registrar.store.lookup("acme", "1001", T0 + 10)[0].uri.host == "192.0.2.20"


def test_refresh_replaces_binding(registrar: Registrar) -> None:
    phone = Phone("1001", "secret1")
    registered(registrar, phone, expires=120)
    registered(registrar, phone, expires=600, now=T0 + 100)
    [binding] = registrar.store.lookup("acme", "1001", T0 + 500)
    assert binding.expires_at == T0 + 700


def test_expires_zero_removes_one_binding(registrar: Registrar) -> None:
    phone = Phone("1001", "secret1")
    registered(registrar, phone, contacts=["<sip:1001@192.0.2.10>", "<sip:1001@192.0.2.11>"])
    resp = registered(registrar, phone, contacts=["<sip:1001@192.0.2.10>;expires=0"])
    assert resp.headers.get_all("Contact") == ["<sip:1001@192.0.2.11>;expires=3600"]


def test_wildcard_removes_all(registrar: Registrar) -> None:
    phone = Phone("1001", "secret1")
    registered(registrar, phone, contacts=["<sip:1001@192.0.2.10>", "<sip:1001@192.0.2.11>"])
    resp = registered(registrar, phone, contacts=["*"], expires=0)
    assert resp.status == 200
    assert resp.headers.get_all("Contact") == []
    assert registrar.store.count() == 0


def test_wildcard_without_expires_zero_is_400(registrar: Registrar) -> None:
    resp = registered_any(registrar, Phone("1001", "secret1"), contacts=["*"], expires=60)
    assert resp.status == 400


def test_out_of_order_cseq_is_500(registrar: Registrar) -> None:
    phone = Phone("1001", "secret1")
    registered(registrar, phone)
    phone.cseq = -1  # the same Call-ID with an older CSeq
    resp = registered_any(registrar, phone)
    assert resp.status == 500


def test_the_same_register_again_is_answered_as_before(registrar: Registrar) -> None:
    """A retransmission handled as a new request (its transaction died with the active SIP Server;
    the standby holds the binding it made): the same 200 with the bindings, not 500."""
    phone = Phone("1001", "secret1")
    first = registered(registrar, phone, expires=600)
    phone.cseq = 0  # the same Call-ID and CSeq as the REGISTER that made the binding
    again = registered_any(registrar, phone, expires=600)
    assert again.status == 200
    assert again.headers.get_all("Contact") == first.headers.get_all("Contact")
    assert registrar.store.count() == 1


def test_bad_expires_is_400(registrar: Registrar) -> None:
    resp = registered_any(registrar, Phone("1001", "secret1"), contacts=["<sip:1001@192.0.2.10>;expires=abc"])
    assert resp.status == 400


def test_store_round_trips_through_dict(registrar: Registrar) -> None:
    registered(registrar, Phone("1001", "secret1"))
    copy = BindingStore.from_dict(registrar.store.to_dict())
    assert copy == registrar.store


def test_on_change_hook(registrar: Registrar) -> None:
    seen: list[tuple[str, str]] = []
    registrar.on_change = lambda t, e: seen.append((t, e))
    registered(registrar, Phone("1001", "secret1"))
    assert seen == [("acme", "1001")]
