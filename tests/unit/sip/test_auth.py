"""Digest authentication (services/sip/auth.py): RFC 7616 vectors, stateless nonces, client side."""

from __future__ import annotations

import ast
import pathlib

import pytest

from services.sip import auth
from services.sip.auth import DigestChallenger, build_authorization, digest_response, parse_digest

# RFC 7616 section 3.9.1: the example for user "Mufasa", password "Circle of Life".
RFC7616_REALM = "http-auth@example.org"
RFC7616_NONCE = "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v"
RFC7616_CNONCE = "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ"
RFC7616_OPAQUE = "FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS"
RFC7616_SHA256 = "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"
RFC7616_MD5 = "8ca523f5e9506fed4657c9700eebdbec"


@pytest.mark.parametrize(("algorithm", "expected"), [("SHA-256", RFC7616_SHA256), ("MD5", RFC7616_MD5)])
def test_rfc7616_example_response(algorithm: str, expected: str) -> None:
    assert (
        digest_response(
            algorithm=algorithm,
            username="Mufasa",
            realm=RFC7616_REALM,
            password="Circle of Life",
            method="GET",
            uri="/dir/index.html",
            nonce=RFC7616_NONCE,
            qop="auth",
            nc="00000001",
            cnonce=RFC7616_CNONCE,
        )
        == expected
    )


@pytest.mark.parametrize(("algorithm", "expected"), [("SHA-256", RFC7616_SHA256), ("MD5", RFC7616_MD5)])
def test_rfc7616_example_build_authorization(algorithm: str, expected: str) -> None:
    challenge = (
        f'Digest realm="{RFC7616_REALM}", qop="auth, auth-int", algorithm={algorithm}, '
        f'nonce="{RFC7616_NONCE}", opaque="{RFC7616_OPAQUE}"'
    )
    value = build_authorization(
        challenge,
        method="GET",
        uri="/dir/index.html",
        username="Mufasa",
        password="Circle of Life",
        cnonce=RFC7616_CNONCE,
    )
    params = parse_digest(value)
    assert params["response"] == expected
    assert params["qop"] == "auth"
    assert params["nc"] == "00000001"
    assert params["cnonce"] == RFC7616_CNONCE
    assert params["opaque"] == RFC7616_OPAQUE
    assert params["algorithm"] == algorithm
    assert params["username"] == "Mufasa"


def test_parse_digest_quotes_escapes_and_commas() -> None:
    params = parse_digest('digest realm="a, \\"b\\"", nonce=abc ,qop="auth,auth-int",stale=TRUE')
    assert params == {"realm": 'a, "b"', "nonce": "abc", "qop": "auth,auth-int", "stale": "TRUE"}


@pytest.mark.parametrize("bad", ["Basic abc", 'Digest realm="unterminated', "Digest realm"])
def test_parse_digest_rejects_malformed(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_digest(bad)


def test_rfc2069_form_without_qop() -> None:
    value = build_authorization(
        'Digest realm="r", nonce="n"', method="REGISTER", uri="sip:r", username="u", password="p"
    )
    params = parse_digest(value)
    assert "qop" not in params and "cnonce" not in params
    assert params["response"] == digest_response(
        algorithm="MD5", username="u", realm="r", password="p", method="REGISTER", uri="sip:r", nonce="n"
    )


USERS = {"alice": "s3cret", "bob": "hunter2"}


def lookup(user: str) -> str | None:
    return USERS.get(user)


@pytest.fixture
def challenger() -> DigestChallenger:
    return DigestChallenger("callvault.test", b"server secret", nonce_ttl=60.0)


def answer(challenge: str, *, method: str = "REGISTER", password: str = "s3cret", user: str = "alice") -> str:
    return build_authorization(
        challenge, method=method, uri="sip:callvault.test", username=user, password=password
    )


def test_challenges_one_per_algorithm_preferred_first(challenger: DigestChallenger) -> None:
    values = challenger.challenges(1000.0)
    assert [parse_digest(v)["algorithm"] for v in values] == ["SHA-256", "MD5"]
    for value in values:
        params = parse_digest(value)
        assert params["realm"] == "callvault.test"
        assert params["qop"] == "auth"
        assert "stale" not in params
    assert parse_digest(challenger.challenges(1000.0, stale=True)[0])["stale"] == "true"


@pytest.mark.parametrize("index", [0, 1])
def test_verify_roundtrip_sha256_and_md5(challenger: DigestChallenger, index: int) -> None:
    challenge = challenger.challenges(1000.0)[index]
    result = challenger.verify(answer(challenge), "REGISTER", lookup, 1010.0)
    assert result.ok and result.username == "alice" and not result.stale


def test_verify_rejects_wrong_password_method_and_user(challenger: DigestChallenger) -> None:
    challenge = challenger.challenges(1000.0)[0]
    bad = challenger.verify(answer(challenge, password="nope"), "REGISTER", lookup, 1001.0)
    assert not bad.ok and not bad.stale and bad.username == "alice"
    assert not challenger.verify(answer(challenge), "INVITE", lookup, 1001.0).ok
    unknown = challenger.verify(answer(challenge, user="mallory"), "REGISTER", lookup, 1001.0)
    assert not unknown.ok and "unknown user" in unknown.reason


def test_expired_nonce_is_stale_only_with_a_valid_response(challenger: DigestChallenger) -> None:
    challenge = challenger.challenges(1000.0)[0]
    stale = challenger.verify(answer(challenge), "REGISTER", lookup, 1061.0)
    assert not stale.ok and stale.stale
    wrong = challenger.verify(answer(challenge, password="x"), "REGISTER", lookup, 1061.0)
    assert not wrong.ok and not wrong.stale


def test_forged_or_foreign_nonce_rejected(challenger: DigestChallenger) -> None:
    other = DigestChallenger("callvault.test", b"another secret")
    foreign = answer(other.challenges(1000.0)[0])
    result = challenger.verify(foreign, "REGISTER", lookup, 1000.0)
    assert not result.ok and not result.stale and "nonce" in result.reason
    forged = answer('Digest realm="callvault.test", nonce="AAAA", qop="auth", algorithm=SHA-256')
    assert not challenger.verify(forged, "REGISTER", lookup, 1000.0).ok
    # A nonce "from the future" (clock skew beyond tolerance) is not accepted either.
    future = answer(challenger.challenges(5000.0)[0])
    assert not challenger.verify(future, "REGISTER", lookup, 1000.0).ok


def test_nonce_shared_by_a_standby_with_the_same_secret(challenger: DigestChallenger) -> None:
    standby = DigestChallenger("callvault.test", b"server secret", nonce_ttl=60.0)
    assert standby.verify(answer(challenger.challenges(1000.0)[0]), "REGISTER", lookup, 1000.5).ok


def test_nonces_are_unique(challenger: DigestChallenger) -> None:
    assert len({challenger.make_nonce(1.0) for _ in range(100)}) == 100


def test_verify_requires_offered_algorithm_realm_and_qop(challenger: DigestChallenger) -> None:
    nonce = challenger.make_nonce(1000.0)
    sess = answer(f'Digest realm="callvault.test", nonce="{nonce}", qop="auth", algorithm=MD5-sess')
    assert "not offered" in challenger.verify(sess, "REGISTER", lookup, 1000.0).reason
    other_realm = answer(f'Digest realm="elsewhere", nonce="{nonce}", qop="auth"')
    assert "realm" in challenger.verify(other_realm, "REGISTER", lookup, 1000.0).reason
    no_qop = answer(f'Digest realm="callvault.test", nonce="{nonce}"')
    assert "qop" in challenger.verify(no_qop, "REGISTER", lookup, 1000.0).reason
    assert not challenger.verify("Basic YWxpY2U6cw==", "REGISTER", lookup, 1000.0).ok
    assert not challenger.verify('Digest realm="callvault.test"', "REGISTER", lookup, 1000.0).ok


def test_sess_algorithm_roundtrip() -> None:
    challenger = DigestChallenger("r", b"k", algorithms=("SHA-256-sess",))
    challenge = challenger.challenges(10.0)[0]
    assert challenger.verify(answer(challenge), "REGISTER", lookup, 10.0).ok


def test_constructor_validation() -> None:
    with pytest.raises(ValueError):
        DigestChallenger("r", b"")
    with pytest.raises(ValueError):
        DigestChallenger("r", b"k", algorithms=("SHA-1",))


def test_auth_module_is_sans_io() -> None:
    tree = ast.parse(pathlib.Path(auth.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & {"asyncio", "socket", "time", "selectors"}
