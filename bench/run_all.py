"""Every benchmark of the repository, short runs, one after the other (what `make bench` runs).

1. bench/rtp_core_bench.py: the media engine alone, 1,000 calls bridged and 1,000 record-only, 5 s
   each (its own section of docs/BENCHMARKS.md shows longer runs);
2. bench/call_rate.py: the whole stack end to end with SIPp, its default sweep of call rates and
   the concurrency step;
3. bench/crypto_bench.py: envelope encryption, decryption, RSA unwrap and encrypted playback;
4. bench/encode_bench.py: encode throughput per core (x realtime) of WAV, MP3, Opus and FLAC;
5. bench/sip_parse_bench.py: the SIP core's cost of parsing and reading an INVITE.

Each prints its figures as it goes and ends with `name: value` lines; this script ends with those
lines of all of them, one per headline figure. It does not rewrite docs/BENCHMARKS.md unless --write-doc
(then bench/call_rate.py replaces its own section; the rtp_core section is never touched).
A bench that fails to run is reported and the next one still runs; the exit code is then 1.

    .venv/bin/python bench/run_all.py
    .venv/bin/python bench/run_all.py --only call_rate --call-rate-args "--rates 10,20 --no-conc"
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
HEADLINE = re.compile(r"^([a-z][a-z0-9_]*): (\S.*)$")

BENCHES = {
    # name: (script, default arguments)
    "rtp_core": (
        "rtp_core_bench.py",
        ["--calls", "1000", "--mode", "both", "--seconds", "5", "--warmup", "1"],
    ),
    "call_rate": ("call_rate.py", []),
    "crypto": ("crypto_bench.py", []),
    "encode": ("encode_bench.py", ["--seconds", "30"]),
    "sip_parse": ("sip_parse_bench.py", []),
}


def trailing_headlines(lines: list[str]) -> list[tuple[str, str]]:
    """The `name: value` lines a bench ends its output with."""
    out: list[tuple[str, str]] = []
    for line in reversed([ln.rstrip() for ln in lines if ln.strip()]):
        m = HEADLINE.match(line)
        if not m:
            break
        out.append((m.group(1), m.group(2)))
    return list(reversed(out))


def run(name: str, script: Path, args: list[str]) -> tuple[int, list[tuple[str, str]], float]:
    cmd = [sys.executable, str(script), *args]
    print(f"\n=== {name}: {shlex.join(cmd)}", flush=True)
    t0 = time.monotonic()
    lines: list[str] = []
    with subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            print(line, end="", flush=True)
            lines.append(line)
        rc = proc.wait()
    elapsed = time.monotonic() - t0
    print(f"=== {name}: exit {rc} after {elapsed:.0f} s", flush=True)
    return rc, trailing_headlines(lines) if rc == 0 else [], elapsed


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--only", choices=sorted(BENCHES), action="append", help="run only this bench (repeatable)"
    )
    p.add_argument(
        "--write-doc", action="store_true", help="let call_rate.py rewrite its docs/BENCHMARKS.md section"
    )
    p.add_argument("--rtp-core-args", help="replace the rtp_core bench's default arguments")
    p.add_argument("--call-rate-args", help="extra arguments for bench/call_rate.py")
    args = p.parse_args()

    failed: list[str] = []
    headlines: list[tuple[str, str]] = []
    for name, (script_name, default_args) in BENCHES.items():
        if args.only and name not in args.only:
            continue
        script = HERE / script_name
        if not script.exists():
            print(f"\n=== {name}: {script.relative_to(ROOT)} is not in this tree; skipped", flush=True)
            failed.append(name)
            continue
        bench_args = list(default_args)
        if name == "rtp_core" and args.rtp_core_args is not None:
            bench_args = shlex.split(args.rtp_core_args)
        if name == "call_rate":
            if not args.write_doc:
                bench_args.append("--no-doc")
            if args.call_rate_args:
                bench_args += shlex.split(args.call_rate_args)
        rc, lines, _ = run(name, script, bench_args)
        if rc != 0:
            failed.append(name)
        headlines += lines

    print("\n=== headline figures" + (f" (failed: {', '.join(failed)})" if failed else ""), flush=True)
    for key, value in headlines:
        print(f"{key}: {value}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
