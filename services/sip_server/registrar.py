"""The registrar (RFC 3261 section 10): digest-authenticated REGISTER, bindings per (tenant, extension).

Sans-I/O: :meth:`Registrar.handle` takes a parsed REGISTER, where it came from and ``now`` (wall-clock
seconds, so that bindings replicate between hosts) and returns the response to send. Bindings are
plain data (:class:`Binding`, :class:`BindingStore` with ``to_dict`` / ``from_dict``) so that a hot
standby can hold a replica (issue 5).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from services.config import ClusterConfig, Tenant
from services.sip.auth import DigestChallenger
from services.sip.errors import SipParseError
from services.sip.message import Request, Response, make_response
from services.sip.uri import NameAddr, SipUri

log = logging.getLogger(__name__)

#: Most contacts one address-of-record may hold; a REGISTER adding more is refused with 403.
MAX_CONTACTS_PER_AOR = 10
#: Expiry used when neither the Contact nor the request says (RFC 3261 10.3 step 7: locally chosen).
DEFAULT_EXPIRES = 3600
#: The reason phrase of every 403 for bad credentials, whether the user exists or not (neither the
#: challenge nor the refusal may tell who exists: that would let anyone enumerate extensions).
BAD_CREDENTIALS = "Forbidden (bad credentials)"
# Digests of an unknown user are checked against this password, which no user can have, so that
# they cost the same work as a wrong password and get the same answer.
_DECOY_PASSWORD = secrets.token_urlsafe(32)


@dataclass
class Binding:
    """One contact of an address-of-record (RFC 3261 10.3 step 7), with where it registered from."""

    contact: str  # the Contact URI as registered (without header parameters)
    expires_at: float  # wall-clock seconds
    q: float = 1.0
    call_id: str = ""
    cseq: int = 0
    source_host: str = ""  # the REGISTER's source address (received / rport, RFC 3581)
    source_port: int = 0
    transport: str = "udp"
    registered_at: float = 0.0
    user_agent: str = ""

    @property
    def uri(self) -> SipUri:
        return SipUri.parse(self.contact)

    def expires_in(self, now: float) -> int:
        return max(0, int(self.expires_at - now + 0.5))

    def destination(self) -> tuple[str, int, str]:
        """Where requests for this contact are sent: the REGISTER's source (NAT friendly).

        The Request-URI stays the registered contact; the network destination is the address and
        transport the REGISTER came from, which is the contact's own address when there is no NAT.
        """
        if self.source_host:
            return self.source_host, self.source_port, self.transport
        uri = self.uri
        transport = uri.params.get("transport") or "udp"
        return uri.host, uri.port or 5060, transport.lower()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Binding:
        return cls(**d)


def contact_key(uri: SipUri) -> str:
    """Identity of a contact for binding updates (RFC 3261 10.3 step 7 compares URIs, 19.1.4)."""
    transport = (uri.params.get("transport") or "udp").lower()
    user = uri.user or ""
    return f"{uri.scheme}:{user}@{uri.host.lower()}:{uri.port or ''};{transport}"


@dataclass
class BindingStore:
    """Every binding, keyed by ``(tenant id, extension)``; plain data for replication."""

    bindings: dict[tuple[str, str], list[Binding]] = field(default_factory=dict)

    def lookup(self, tenant: str, extension: str, now: float) -> list[Binding]:
        """Live bindings of an AOR, best first: highest q, then most recently registered."""
        live = [b for b in self.bindings.get((tenant, extension), []) if b.expires_at > now]
        return sorted(live, key=lambda b: (-b.q, -b.registered_at))

    def purge(self, now: float) -> int:
        """Drop expired bindings; return how many were dropped."""
        dropped = 0
        for key in list(self.bindings):
            live = [b for b in self.bindings[key] if b.expires_at > now]
            dropped += len(self.bindings[key]) - len(live)
            if live:
                self.bindings[key] = live
            else:
                del self.bindings[key]
        return dropped

    def count(self) -> int:
        return sum(len(v) for v in self.bindings.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "bindings": [
                {"tenant": t, "extension": e, "contacts": [b.to_dict() for b in bs]}
                for (t, e), bs in self.bindings.items()
            ]
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BindingStore:
        store = cls()
        for entry in d.get("bindings", []):
            store.bindings[(entry["tenant"], entry["extension"])] = [
                Binding.from_dict(b) for b in entry["contacts"]
            ]
        return store


class RegisterRejected(Exception):
    """A REGISTER the registrar refuses; carries the response status, reason and extra headers."""

    def __init__(self, status: int, reason: str, headers: list[tuple[str, str]] | None = None) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.headers = headers or []


def password_lookup(tenant: Tenant) -> Callable[[str], str | None]:
    """A digest password look-up over a tenant's users."""

    def lookup(username: str) -> str | None:
        user = tenant.user(username)
        return user.password if user else None

    return lookup


def authenticate(
    request: Request,
    challenger: DigestChallenger,
    tenant: Tenant,
    now: float,
    *,
    proxy: bool = False,
    source: tuple[str, int] | None = None,
) -> tuple[str | None, Response | None]:
    """Check the digest credentials of ``request`` against ``tenant``'s users.

    Returns ``(username, None)`` when they are valid, else ``(None, response)``: 401/407 with fresh
    challenges when the request carries no credentials for our realm (or a stale nonce), 403 when
    they are wrong. ``proxy`` selects Proxy-Authorization / 407 (RFC 3261 22.3) over 401.

    The answers never tell whether a user exists: an unknown user is challenged like any other, and
    its credentials are checked against a decoy password, so it gets the same 403
    (:data:`BAD_CREDENTIALS`) as a wrong password after the same work. Only the log line, for the
    operator, says which it was (with ``source``, the request's address, when given).
    """
    header = "Proxy-Authorization" if proxy else "Authorization"
    status = 407 if proxy else 401
    challenge_header = "Proxy-Authenticate" if proxy else "WWW-Authenticate"
    credentials = [v for v in request.headers.get_all(header) if _realm_of(v) == challenger.realm]
    if not credentials:
        return None, _challenge(request, challenger, now, status, challenge_header, stale=False)
    users = password_lookup(tenant)
    unknown: list[str] = []

    def lookup(username: str) -> str:
        password = users(username)
        if password is None:
            unknown.append(username)
            return _DECOY_PASSWORD
        return password

    result = challenger.verify(credentials[0], request.method, lookup, now)
    if result.ok and not unknown:
        return result.username, None
    if result.stale and not unknown:
        return None, _challenge(request, challenger, now, status, challenge_header, stale=True)
    if unknown:
        what = "unknown user"
    elif result.reason.startswith("wrong response"):
        what = "wrong password"
    else:
        what = result.reason
    log.warning(
        "%s from %s refused for tenant %s: %s%s",
        request.method,
        result.username or "?",
        tenant.id,
        what,
        f" (source {source[0]}:{source[1]})" if source is not None else "",
    )
    return None, make_response(request, 403, BAD_CREDENTIALS)


def _realm_of(value: str) -> str | None:
    from services.sip.auth import parse_digest

    try:
        return parse_digest(value).get("realm")
    except ValueError:
        return None


def _challenge(
    request: Request, challenger: DigestChallenger, now: float, status: int, header: str, *, stale: bool
) -> Response:
    headers = [(header, c) for c in challenger.challenges(now, stale=stale)]
    return make_response(request, status, None, headers=headers)


class Registrar:
    """RFC 3261 10.3 REGISTER processing for every tenant of a cluster."""

    def __init__(
        self,
        config: ClusterConfig,
        challenger: DigestChallenger,
        store: BindingStore | None = None,
        *,
        on_change: Callable[[str, str], None] | None = None,
    ) -> None:
        self.config = config
        self.challenger = challenger
        self.store = store if store is not None else BindingStore()
        #: Called with (tenant, extension) after every change of an AOR's bindings (replication hook).
        self.on_change = on_change

    def tenant_for(self, request: Request) -> Tenant | None:
        """The tenant of a request: by the Request-URI's domain (RFC 3261 10.3 step 1), then To's."""
        for host in (request.uri.host, request.to.uri.host):
            for t in self.config.tenants:
                if host in t.domains:
                    return t
        return self.config.tenant_for_domain(request.uri.host)

    def handle(self, request: Request, source: tuple[str, int], transport: str, now: float) -> Response:
        """Process one REGISTER; return the response (never raises for a remote's mistake)."""
        tenant = self.tenant_for(request)
        if tenant is None:
            return make_response(request, 404, "No tenant serves this domain")
        try:
            aor = request.to.uri
        except SipParseError as exc:
            return make_response(request, exc.status, exc.reason)
        extension = aor.user or ""
        # An unknown extension is challenged and refused exactly like a known one with a wrong
        # password (see authenticate): a 404 before the challenge would let anyone enumerate them.
        username, challenge = authenticate(request, self.challenger, tenant, now, source=source)
        if challenge is not None:
            return challenge
        if username != extension:
            log.info("REGISTER of %s by %s refused: third-party registration", extension, username)
            return make_response(request, 403, "Forbidden (credentials do not match the AOR)")
        try:
            changed = self._update(request, tenant.id, extension, source, transport, now)
        except RegisterRejected as exc:
            return make_response(request, exc.status, exc.reason, headers=exc.headers)
        except SipParseError as exc:
            return make_response(request, exc.status, exc.reason)
        if changed and self.on_change is not None:
            self.on_change(tenant.id, extension)
        contacts = [
            (
                "Contact",
                f"<{b.contact}>;expires={b.expires_in(now)}" + (f";q={_fmt_q(b.q)}" if b.q != 1.0 else ""),
            )
            for b in self.store.lookup(tenant.id, extension, now)
        ]
        return make_response(request, 200, "OK", headers=contacts)

    def _update(
        self,
        request: Request,
        tenant: str,
        extension: str,
        source: tuple[str, int],
        transport: str,
        now: float,
    ) -> bool:
        """RFC 3261 10.3 steps 6-7; returns whether the bindings changed (False for a query)."""
        raw_contacts = request.headers.get_all("Contact")
        if not raw_contacts:
            return False  # a query: answer the current bindings
        header_expires = _parse_expires(request.headers.get("Expires"), "Expires header")
        cseq = request.cseq.seq
        call_id = request.call_id
        key = (tenant, extension)
        current = [b for b in self.store.bindings.get(key, []) if b.expires_at > now]
        if any(c.strip() == "*" for c in raw_contacts):
            # RFC 3261 10.3 step 6: "*" only alone and only with Expires: 0.
            if len(raw_contacts) != 1 or header_expires != 0:
                raise RegisterRejected(400, "Contact * needs Expires: 0 and no other Contact")
            for b in current:
                if b.call_id == call_id and cseq <= b.cseq:
                    raise RegisterRejected(500, "Out of order REGISTER (CSeq)", [("Retry-After", "1")])
            self.store.bindings.pop(key, None)
            return True
        updates: list[tuple[SipUri, int, float]] = []
        for raw in raw_contacts:
            contact = NameAddr.parse(raw)
            expires = _parse_expires(contact.params.get("expires"), "Contact expires")
            if expires is None:
                expires = header_expires if header_expires is not None else DEFAULT_EXPIRES
            if expires != 0:
                min_expires = self.config.sip_server.min_expires
                if expires < min_expires:
                    raise RegisterRejected(423, "Interval Too Brief", [("Min-Expires", str(min_expires))])
                expires = min(expires, self.config.sip_server.max_expires)
            q = _parse_q(contact.params.get("q"))
            updates.append((contact.uri, expires, q))
        by_key = {contact_key(b.uri): b for b in current}
        for uri, _expires, _q in updates:
            existing = by_key.get(contact_key(uri))
            if existing is not None and existing.call_id == call_id and cseq <= existing.cseq:
                if cseq == existing.cseq:
                    # The very REGISTER that made this binding, again: a retransmission whose
                    # transaction is gone (a hot standby took over, issue 5). Answered as the
                    # first time (200, the bindings), not refused.
                    log.info("REGISTER %s@%s CSeq %d again: answered as before", extension, tenant, cseq)
                    return False
                raise RegisterRejected(500, "Out of order REGISTER (CSeq)", [("Retry-After", "1")])
        user_agent = request.headers.get("User-Agent") or ""
        for uri, expires, q in updates:
            k = contact_key(uri)
            if expires == 0:
                by_key.pop(k, None)
                continue
            by_key[k] = Binding(
                contact=str(_strip_uri(uri)),
                expires_at=now + expires,
                q=q,
                call_id=call_id,
                cseq=cseq,
                source_host=source[0],
                source_port=source[1],
                transport=transport.lower(),
                registered_at=now,
                user_agent=user_agent,
            )
        if len(by_key) > MAX_CONTACTS_PER_AOR:
            raise RegisterRejected(403, f"Too many contacts (at most {MAX_CONTACTS_PER_AOR})")
        if by_key:
            self.store.bindings[key] = list(by_key.values())
        else:
            self.store.bindings.pop(key, None)
        log.info(
            "REGISTER %s@%s from %s:%d/%s: %d binding(s)",
            extension,
            tenant,
            source[0],
            source[1],
            transport,
            len(by_key),
        )
        return True


def _strip_uri(uri: SipUri) -> SipUri:
    """The contact URI without URI headers (RFC 3261 10.3: they are not part of the binding)."""
    out = uri.copy()
    out.headers = {}
    return out


def _parse_expires(value: str | None, what: str) -> int | None:
    if value is None:
        return None
    try:
        expires = int(value.strip())
    except ValueError:
        raise RegisterRejected(400, f"{what} is not a number: {value!r}") from None
    if expires < 0:
        raise RegisterRejected(400, f"{what} is negative")
    return min(expires, 2**32 - 1)


def _parse_q(value: str | None) -> float:
    if value is None:
        return 1.0
    try:
        q = float(value)
    except ValueError:
        raise RegisterRejected(400, f"Contact q is not a number: {value!r}") from None
    if not 0.0 <= q <= 1.0:
        raise RegisterRejected(400, f"Contact q must be within 0..1, not {value}")
    return q


def _fmt_q(q: float) -> str:
    return f"{q:.3f}".rstrip("0").rstrip(".") if q != int(q) else f"{q:.1f}"
