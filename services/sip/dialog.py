"""SIP dialogs (RFC 3261 section 12): identifiers, route sets, CSeq spaces and in-dialog requests.

A :class:`Dialog` is plain data (strings, ints, parsed URIs) so it can be copied to a hot standby
with :meth:`Dialog.to_dict` / :meth:`Dialog.from_dict`. It builds requests but does not send them:
the TU passes them to the endpoint with :meth:`Dialog.next_hop` as the destination.

Sans-I/O: no sockets, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import InvalidStateError, SipParseError
from .message import Message, Request, Response
from .uri import NameAddr, SipUri

__all__ = ["TARGET_REFRESH_METHODS", "Dialog", "destination", "uac_dialog_id", "uas_dialog_id"]

#: Requests whose Contact replaces the remote target (RFC 3261 12.2, RFC 3311, RFC 6665).
TARGET_REFRESH_METHODS = frozenset({"INVITE", "UPDATE", "SUBSCRIBE", "NOTIFY", "REFER"})


def destination(uri: SipUri) -> tuple[str, int, str]:
    """``(host, port, transport)`` for a URI, without DNS (RFC 3263 reduced to literal hosts).

    ``maddr`` overrides the host; the port defaults to 5060, or 5061 for ``sips:`` / TLS; the
    transport is the ``transport`` parameter ('udp' when absent, 'tls' for ``sips:``).
    """
    transport = uri.transport
    if uri.secure and "transport" not in uri.params:
        transport = "tls"
    host = uri.params.get("maddr") or uri.host
    port = uri.port or (5061 if transport == "tls" else 5060)
    return host, port, transport


def uas_dialog_id(request: Request) -> tuple[str, str, str]:
    """The dialog id seen by the UAS of a request: (Call-ID, To tag, From tag) (12.1.1)."""
    return request.call_id, request.to.tag or "", request.from_.tag or ""


def uac_dialog_id(response: Response) -> tuple[str, str, str]:
    """The dialog id seen by the UAC of a response: (Call-ID, From tag, To tag) (12.1.2)."""
    return response.call_id, response.from_.tag or "", response.to.tag or ""


def _without_tag(addr: NameAddr) -> NameAddr:
    addr = addr.copy()
    addr.params.pop("tag", None)
    return addr


def _with_tag(addr: NameAddr, tag: str) -> str:
    addr = addr.copy()
    if tag:
        addr.params["tag"] = tag
    return str(addr)


def _remote_target(message: Message, what: str) -> SipUri:
    contacts = message.contacts
    if not contacts:
        raise SipParseError(f"Contact header is missing in the {what}")
    return contacts[0].uri.copy()


def _via_transport(message: Message) -> str:
    try:
        return message.top_via.transport.lower()
    except SipParseError:
        return "udp"


@dataclass
class Dialog:
    """RFC 3261 12: the state shared by the two ends of a dialog, seen from this end.

    ``route_set`` holds Route header values (``<sip:proxy;lr>``) in the order they are used.
    ``local_target`` is our own Contact (added to target-refresh requests); ``early`` is True for
    a dialog created by a provisional response (12.1.2) until a 2xx confirms it.
    """

    call_id: str
    local_tag: str
    remote_tag: str
    local_uri: NameAddr
    remote_uri: NameAddr
    remote_target: SipUri
    route_set: list[str]
    local_cseq: int
    remote_cseq: int | None
    transport: str
    local_target: SipUri | None = None
    secure: bool = False
    early: bool = False

    # -- creation ---------------------------------------------------------------------------
    @classmethod
    def from_uac(cls, request: Request, response: Response) -> Dialog:
        """The UAC's dialog from the request it sent and a 2xx or 101-199 with a To tag (12.1.2).

        Route set = the response's Record-Route in reverse order; remote target = its Contact.
        """
        if response.status < 101 or response.status >= 300:
            raise InvalidStateError(f"a {response.status} response does not create a dialog")
        contacts = request.contacts
        return cls(
            call_id=request.call_id,
            local_tag=request.from_.tag or "",
            remote_tag=response.to.tag or "",
            local_uri=_without_tag(request.from_),
            remote_uri=_without_tag(request.to),
            remote_target=_remote_target(response, f"{response.status} response"),
            route_set=list(reversed(response.headers.get_all("Record-Route"))),
            local_cseq=request.cseq.seq,
            remote_cseq=None,
            transport=_via_transport(request),
            local_target=contacts[0].uri.copy() if contacts else None,
            secure=request.uri.secure,
            early=response.status < 200,
        )

    @classmethod
    def from_uas(cls, request: Request, local_tag: str, *, local_target: SipUri | None = None) -> Dialog:
        """The UAS's dialog from the request and the To tag it answers with (12.1.1).

        Route set = the request's Record-Route in order; remote target = its Contact; the local
        CSeq starts empty (0: the first request we send has CSeq 1).
        """
        return cls(
            call_id=request.call_id,
            local_tag=local_tag,
            remote_tag=request.from_.tag or "",
            local_uri=_without_tag(request.to),
            remote_uri=_without_tag(request.from_),
            remote_target=_remote_target(request, f"{request.method} request"),
            route_set=list(request.headers.get_all("Record-Route")),
            local_cseq=0,
            remote_cseq=request.cseq.seq,
            transport=_via_transport(request),
            local_target=local_target.copy() if local_target is not None else None,
            secure=request.uri.secure,
        )

    @property
    def id(self) -> tuple[str, str, str]:
        """(Call-ID, local tag, remote tag) (12)."""
        return self.call_id, self.local_tag, self.remote_tag

    # -- requests within the dialog (12.2.1) ----------------------------------------------------
    def _request_uri_and_routes(self) -> tuple[SipUri, list[str]]:
        """12.2.1.1: loose routing keeps the remote target as Request-URI; a strict router (no
        ``;lr`` on the first route) gets the Request-URI and the remote target goes last in Route."""
        if not self.route_set:
            return self.remote_target.copy(), []
        first = NameAddr.parse(self.route_set[0])
        if "lr" in first.uri.params:
            return self.remote_target.copy(), list(self.route_set)
        uri = first.uri.copy()
        uri.headers = {}  # 19.1.1: headers are not allowed in a Request-URI
        return uri, [*self.route_set[1:], f"<{self.remote_target}>"]

    def _build(self, method: str, seq: int, body: bytes, content_type: str | None) -> Request:
        uri, routes = self._request_uri_and_routes()
        request = Request(method, uri)
        headers = request.headers
        for route in routes:
            headers.add("Route", route)
        headers.add("Max-Forwards", "70")
        headers.add("From", _with_tag(self.local_uri, self.local_tag))
        headers.add("To", _with_tag(self.remote_uri, self.remote_tag))
        headers.add("Call-ID", self.call_id)
        headers.add("CSeq", f"{seq} {method}")
        if content_type is not None:
            headers.add("Content-Type", content_type)
        request.body = body
        return request

    def create_request(
        self,
        method: str,
        *,
        body: bytes = b"",
        content_type: str | None = None,
        headers: list[tuple[str, str]] | None = None,
    ) -> Request:
        """A request within the dialog (12.2.1.1): local CSeq + 1, From/To with tags, Call-ID,
        Request-URI and Route from the route set; Contact on target-refresh requests. No Via: the
        endpoint adds its own when sending. ACK and CANCEL are not built here (see
        :meth:`create_ack` and ``transaction.build_cancel``)."""
        method = method.upper()
        if method in ("ACK", "CANCEL"):
            raise InvalidStateError(f"{method} is not created with create_request()")
        self.local_cseq += 1
        request = self._build(method, self.local_cseq, body, content_type)
        if method in TARGET_REFRESH_METHODS and self.local_target is not None:
            request.headers.add("Contact", f"<{self.local_target}>")
        for name, value in headers or ():
            request.headers.add(name, value)
        return request

    def create_ack(self, invite: Request, *, body: bytes = b"", content_type: str | None = None) -> Request:
        """The ACK for a 2xx to ``invite`` (13.2.2.4): same CSeq number, method ACK, the INVITE's
        credentials; routed like any request in the dialog."""
        ack = self._build("ACK", invite.cseq.seq, body, content_type)
        for name in ("Authorization", "Proxy-Authorization"):
            for value in invite.headers.get_all(name):
                ack.headers.add(name, value)
        return ack

    def next_hop(self) -> tuple[str, int, str]:
        """Where to send a request of this dialog: the first route, else the remote target.

        The transport is the URI's ``transport`` parameter, or the dialog's transport when the
        URI has none.
        """
        uri = NameAddr.parse(self.route_set[0]).uri if self.route_set else self.remote_target
        host, port, transport = destination(uri)
        if "transport" not in uri.params and not uri.secure:
            transport = self.transport
        return host, port, transport

    # -- requests and responses from the peer -------------------------------------------------
    def receive_request(self, request: Request) -> None:
        """12.2.2: check and record the remote CSeq; target refresh on INVITE/UPDATE/...

        Raises SipParseError(481) for a request of another dialog and SipParseError(500) for a
        CSeq lower than the last one (out of order). ACK and CANCEL carry the INVITE's CSeq
        number and are not checked.
        """
        if request.call_id != self.call_id or (request.from_.tag or "") != self.remote_tag:
            raise SipParseError(481, "Call/Transaction Does Not Exist")
        if request.method in ("ACK", "CANCEL"):
            return
        seq = request.cseq.seq
        if self.remote_cseq is not None and seq < self.remote_cseq:
            raise SipParseError(500, f"CSeq {seq} out of order (last {self.remote_cseq})")
        self.remote_cseq = seq
        if request.method in TARGET_REFRESH_METHODS and request.contacts:
            self.remote_target = request.contacts[0].uri.copy()

    def receive_response(self, request: Request, response: Response) -> None:
        """Update from a response to a request we sent in this dialog: a 2xx confirms an early
        dialog (12.1.2: the route set of the 2xx wins) and a 2xx to a target refresh replaces the
        remote target (12.2.1.2)."""
        if not 200 <= response.status < 300:
            return
        if self.early and request.method == "INVITE":
            self.early = False
            self.remote_tag = response.to.tag or self.remote_tag
            self.route_set = list(reversed(response.headers.get_all("Record-Route")))
        if request.method in TARGET_REFRESH_METHODS and response.contacts:
            self.remote_target = response.contacts[0].uri.copy()

    # -- replication ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly state (strings and numbers only)."""
        return {
            "call_id": self.call_id,
            "local_tag": self.local_tag,
            "remote_tag": self.remote_tag,
            "local_uri": str(self.local_uri),
            "remote_uri": str(self.remote_uri),
            "remote_target": str(self.remote_target),
            "route_set": list(self.route_set),
            "local_cseq": self.local_cseq,
            "remote_cseq": self.remote_cseq,
            "transport": self.transport,
            "local_target": str(self.local_target) if self.local_target is not None else None,
            "secure": self.secure,
            "early": self.early,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Dialog:
        """Inverse of :meth:`to_dict`; raises KeyError / SipParseError for a damaged dict."""
        local_target = d.get("local_target")
        return cls(
            call_id=d["call_id"],
            local_tag=d["local_tag"],
            remote_tag=d["remote_tag"],
            local_uri=NameAddr.parse(d["local_uri"]),
            remote_uri=NameAddr.parse(d["remote_uri"]),
            remote_target=SipUri.parse(d["remote_target"]),
            route_set=list(d["route_set"]),
            local_cseq=int(d["local_cseq"]),
            remote_cseq=None if d["remote_cseq"] is None else int(d["remote_cseq"]),
            transport=d["transport"],
            local_target=SipUri.parse(local_target) if local_target else None,
            secure=bool(d.get("secure", False)),
            early=bool(d.get("early", False)),
        )
