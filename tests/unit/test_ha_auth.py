"""services/ha_auth.py, sans-I/O: the challenge answer shared by the SIP Server and RM pairs, and
the sealed lines of the RM link (good ones accepted; bad, missing, truncated, replayed refused)."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from services import ha_auth
from services.sip_server import replication as sip_rp

KEY = b"k" * 32


def test_challenge_answer() -> None:
    nonce = ha_auth.new_nonce()
    assert len(nonce) == 2 * ha_auth.NONCE_BYTES and nonce != ha_auth.new_nonce()
    answer = ha_auth.mac(b"secret", nonce, "node-a")
    assert ha_auth.verify(b"secret", nonce, "node-a", answer)
    assert not ha_auth.verify(b"other", nonce, "node-a", answer)
    assert not ha_auth.verify(b"secret", ha_auth.new_nonce(), "node-a", answer)  # replayed
    assert not ha_auth.verify(b"secret", nonce, "node-b", answer)
    assert not ha_auth.verify(b"secret", nonce, "node-a", answer[:-2])  # truncated
    assert not ha_auth.verify(b"secret", nonce, "node-a", None)  # missing
    assert not ha_auth.verify(b"secret", nonce, "node-a", answer, "callvault-rm")  # other link


def test_the_sip_server_pair_keeps_its_wire_format() -> None:
    """Both SIP Servers of a pair must agree: the answer is the one of before the move."""
    expected = hmac.new(b"s", b"callvault-ha\nn1\nnode-a", hashlib.sha256).hexdigest()
    msg = sip_rp.auth_message(b"s", "n1", "node-a")
    assert msg == {"type": "auth", "mac": expected}
    assert sip_rp.verify_auth(b"s", "n1", "node-a", msg)
    assert not sip_rp.verify_auth(b"s", "n2", "node-a", msg)
    assert not sip_rp.verify_auth(b"s", "n1", "node-a", {"type": "auth"})


def test_session_keys_differ_per_connection_and_role_order() -> None:
    k = ha_auth.session_key(b"s", "ctx", "n1", "n2")
    assert k == ha_auth.session_key(b"s", "ctx", "n1", "n2")
    assert k != ha_auth.session_key(b"s", "ctx", "n2", "n1")
    assert k != ha_auth.session_key(b"s", "ctx", "n1", "n3")
    assert k != ha_auth.session_key(b"t", "ctx", "n1", "n2")


def test_good_lines_accepted_in_order() -> None:
    sealer, opener = ha_auth.Sealer(KEY, "a"), ha_auth.Opener(KEY, "a")
    lines = [b'{"t":"put","entry":{"session_id":"s 1"}}\n', b"{}", b'{"x": "a b c"}\n']
    for line in lines:
        assert opener.open(sealer.seal(line)) == line.rstrip(b"\n") + b"\n"
    assert sealer.seq == opener.seq == 3


@pytest.mark.parametrize(
    "mangle",
    [
        pytest.param(lambda good, body: body, id="missing"),
        pytest.param(lambda good, body: good[:-11] + b"\n", id="truncated"),
        pytest.param(lambda good, body: good[:-3] + b"00\n", id="bad"),
        pytest.param(lambda good, body: good.replace(b"mcp1", b"mcp9"), id="altered"),
        pytest.param(lambda good, body: good.upper(), id="upper-case"),
        pytest.param(lambda good, body: body.rstrip(b"\n") + b" " + b"g" * 64 + b"\n", id="not-hex"),
        pytest.param(lambda good, body: b"", id="empty"),
    ],
)
def test_bad_lines_refused_without_shifting_the_sequence(mangle) -> None:  # type: ignore[no-untyped-def]
    sealer, opener = ha_auth.Sealer(KEY, "a"), ha_auth.Opener(KEY, "a")
    body = b'{"t":"put","entry":{"mcp":"mcp1"}}\n'
    good = sealer.seal(body)
    with pytest.raises(ha_auth.AuthError):
        opener.open(mangle(good, body))
    assert opener.seq == 0
    assert opener.open(good) == body  # the genuine line still opens


def test_replayed_reordered_and_reflected_lines_refused() -> None:
    sealer, opener = ha_auth.Sealer(KEY, "a"), ha_auth.Opener(KEY, "a")
    first, second = sealer.seal(b"1"), sealer.seal(b"2")
    with pytest.raises(ha_auth.AuthError):
        opener.open(second)  # reordered (or the first one deleted)
    assert opener.open(first) == b"1\n"
    with pytest.raises(ha_auth.AuthError):
        opener.open(first)  # replayed
    assert opener.open(second) == b"2\n"
    with pytest.raises(ha_auth.AuthError):
        ha_auth.Opener(KEY, "b").open(ha_auth.Sealer(KEY, "a").seal(b"1"))  # from the other side's name


def test_a_sealed_message_is_one_line() -> None:
    with pytest.raises(ValueError):
        ha_auth.Sealer(KEY, "a").seal(b"a\nb")
