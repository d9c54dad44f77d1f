"""SIP message cost: parse a typical authenticated INVITE and read what a B2BUA's receive path
reads of it (transaction key, dialog ids, CSeq, Contact), in microseconds per message.

With --base REV, the services/sip package of that git revision is extracted to a temporary
directory and measured interleaved with the working tree's, so the two are compared in the same
minutes (this machine is shared and noisy: medians of rounds, and the ratio).

    .venv/bin/python bench/sip_parse_bench.py
    .venv/bin/python bench/sip_parse_bench.py --base HEAD~1 --rounds 7

Ends with one `name: value` line: sip_invite_parse_and_read_us.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import subprocess
import sys
import tempfile
import timeit
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent

INVITE = (
    b"INVITE sip:1002@127.0.0.1:5060 SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bK-1234-1-0;rport\r\n"
    b'From: "1001" <sip:1001@127.0.0.1:5060>;tag=1234SIPpTag001\r\n'
    b"To: <sip:1002@127.0.0.1:5060>\r\n"
    b"Call-ID: 1-1234@127.0.0.1\r\nCSeq: 2 INVITE\r\n"
    b"Contact: <sip:1001@127.0.0.1:5061>\r\nMax-Forwards: 70\r\n"
    b'Proxy-Authorization: Digest username="1001",realm="127.0.0.1",nonce="abc",'
    b'uri="sip:1002@127.0.0.1:5060",response="0123456789abcdef0123456789abcdef",algorithm=MD5\r\n'
    b"Content-Type: application/sdp\r\nContent-Length: 0\r\n\r\n"
)


def use(message: ModuleType) -> None:
    msg = message.parse_message(INVITE)
    # as the transaction layer and the B2BUA do: server transaction key, dialog ids, CSeq, target
    _ = (msg.top_via, msg.branch, msg.from_.tag, msg.to.tag, msg.call_id, msg.cseq, msg.contacts)
    _ = msg.top_via


def per_message_us(message: ModuleType, number: int = 2000) -> float:
    return min(timeit.repeat(lambda: use(message), number=number, repeat=3)) / number * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", help="a git revision to compare with")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    builds = {"this tree": importlib.import_module("services.sip.message")}
    with tempfile.TemporaryDirectory() as tmp:
        if args.base:
            archive = subprocess.run(
                ["git", "-C", str(ROOT), "archive", args.base, "services/sip"],
                check=True,
                capture_output=True,
            ).stdout
            subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
            (Path(tmp) / "services" / "sip").rename(Path(tmp) / "base_sip")
            sys.path.insert(0, tmp)
            builds = {args.base: importlib.import_module("base_sip.message"), **builds}
        runs: dict[str, list[float]] = {name: [] for name in builds}
        for m in builds.values():
            use(m)  # warm
        for _ in range(args.rounds):
            for name, m in builds.items():
                runs[name].append(per_message_us(m))
    first = None
    for name, xs in runs.items():
        med = statistics.median(xs)
        first = first or med
        print(
            f"{name}: median {med:.1f} us per INVITE parsed and read (runs {', '.join(f'{x:.1f}' for x in xs)})"
            + (f", {med / first:.2f}x {next(iter(runs))}" if len(runs) > 1 else ""),
            flush=True,
        )
    print(f"sip_invite_parse_and_read_us: {statistics.median(runs['this tree']):.1f}")


if __name__ == "__main__":
    main()
