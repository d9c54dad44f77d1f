#!/usr/bin/env python3
"""Container health check of the compose lab (installed as /usr/local/bin/callvault-healthcheck).

    callvault-healthcheck http http://127.0.0.1:8080/healthz    healthy: HTTP 200
    callvault-healthcheck sip  127.0.0.1:5070                   healthy: 200 to an OPTIONS over UDP
    callvault-healthcheck tcp  127.0.0.1:5066                   healthy: accepts a TCP connection
                                                                (a SIP Server of the HA pair: its
                                                                replication port, which the standby
                                                                opens too; the SIP address answers
                                                                for whichever one is active)

Standard library only, exit status 0 (healthy) or 1 (unhealthy) with one line saying why. An MCP
answers OPTIONS with 503 while it drains, so a draining MCP reports unhealthy, as it should.
"""

from __future__ import annotations

import secrets
import socket
import sys
import urllib.error
import urllib.request

TIMEOUT = 3.0


def check_http(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
            if response.status != 200:
                return f"{url}: HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return f"{url}: HTTP {exc.code}"
    except OSError as exc:
        return f"{url}: {exc}"
    return None


def check_sip(target: str) -> str | None:
    host, _, port_text = target.rpartition(":")
    host = host.strip("[]")
    port = int(port_text)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect((host, port))
        local_host, local_port = sock.getsockname()[:2]
        local = f"[{local_host}]" if ":" in local_host else local_host
        remote = f"[{host}]" if ":" in host else host
        branch = "z9hG4bK" + secrets.token_hex(8)
        request = (
            f"OPTIONS sip:{remote}:{port} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {local}:{local_port};branch={branch};rport\r\n"
            "Max-Forwards: 70\r\n"
            f"From: <sip:healthcheck@{local}>;tag={secrets.token_hex(4)}\r\n"
            f"To: <sip:{remote}:{port}>\r\n"
            f"Call-ID: {secrets.token_hex(12)}@{local}\r\n"
            "CSeq: 1 OPTIONS\r\n"
            "Accept: application/sdp\r\n"
            "Content-Length: 0\r\n\r\n"
        )
        try:
            sock.send(request.encode())
            while True:
                data = sock.recv(65535)
                status_line = data.split(b"\r\n", 1)[0].decode(errors="replace")
                parts = status_line.split(" ", 2)
                if len(parts) < 2 or parts[0] != "SIP/2.0" or not parts[1].isdigit():
                    return f"{target}: not a SIP response: {status_line!r}"
                status = int(parts[1])
                if status < 200:
                    continue  # provisional: wait for the final answer
                return None if status == 200 else f"{target}: OPTIONS answered {status_line}"
        except OSError as exc:
            return f"{target}: no answer to OPTIONS ({exc})"


def check_tcp(target: str) -> str | None:
    host, _, port_text = target.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port_text)), timeout=TIMEOUT):
            return None
    except OSError as exc:
        return f"{target}: {exc}"


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("http", "sip", "tcp"):
        print(__doc__, file=sys.stderr)
        return 2
    kind, target = argv
    problem = {"http": check_http, "sip": check_sip, "tcp": check_tcp}[kind](target)
    if problem:
        print(f"unhealthy: {problem}")
        return 1
    print(f"healthy: {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
