"""rtp_core load benchmark: N concurrent G.711 calls from a C load generator into one Engine process.

The engine runs in its own process pinned to one core (taskset), the generator (bench/loadgen.c,
compiled here with gcc) on the other.  Bridge mode: every call has two legs, each phone sends 50
packets/s, the engine relays each packet to the other phone and records both into a stereo WAV.
Record mode (SIPREC-like): two inbound streams per call, recorded, nothing relayed.

Reported per load: the engine's CPU per inbound packet (from /proc/<pid>/task/*/schedstat, so
threads and kernel time on its core count), the capacity per core that implies (a call = 100
inbound packets/s), loss and relay latency seen by the generator, the engine's RSS per call.

    .venv/bin/python bench/rtp_core_bench.py --calls 500,1000 --mode both --seconds 8
    .venv/bin/python bench/rtp_core_bench.py --find-max --mode bridge

Ends with one `name: value` line per headline figure.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import machine

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
if os.environ.get("RTPBENCH_PATH"):  # compare another build of rtp_core
    sys.path.insert(0, os.environ["RTPBENCH_PATH"])


# ---- the engine process -------------------------------------------------------------------------


def rss_kb(pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def engine_main(args: argparse.Namespace) -> None:
    import rtp_core

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:  # 5 descriptors per recorded session; root may raise the hard limit for the largest loads
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(hard, 65536), max(hard, 65536)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    base = rss_kb()
    eng = rtp_core.Engine(
        bind_ip="127.0.0.1", port_min=10000, port_max=32767, threads=args.threads, io=args.io
    )
    sids = []
    lines = []
    out_dir = Path(args.out_dir)
    for i in range(args.calls):
        path = None if args.out_dir == "none" else str(out_dir / f"{i}.wav")
        sid = eng.open_session(output_path=path, channels=2, mode=args.mode, reorder_ms=args.reorder_ms)
        lines.append(f"{eng.add_leg(sid, 0)} {eng.add_leg(sid, 1)}")
        sids.append(sid)
    Path(args.ports).write_text("\n".join(lines) + "\n")
    print(json.dumps({"ready": True, "rss_base_kb": base, "rss_open_kb": rss_kb(), "io": eng.io}), flush=True)
    while sys.stdin.readline().strip() == "count":  # datagrams received so far (None: an older build)
        counts = [ls.get("datagrams") for ls in eng.loop_stats()]
        print(json.dumps({"datagrams": None if None in counts else sum(counts)}), flush=True)  # type: ignore[arg-type]
    total: dict[str, object] = {"loop": eng.loop_stats()}
    for sid in sids:
        st = eng.close_session(sid)
        total["samples"] = total.get("samples", 0) + st["samples"]  # type: ignore[operator]
        for leg in st["legs"]:
            for k in (
                "packets",
                "lost",
                "late",
                "duplicates",
                "invalid",
                "relayed",
                "send_errors",
                "reanchors",
                "gap_total_ms",
            ):
                total[k] = total.get(k, 0) + leg[k]  # type: ignore[operator]
    eng.close()
    print(json.dumps(total), flush=True)


# ---- the driver ---------------------------------------------------------------------------------


def cpu_ns(pid: int) -> int:
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


def ksoftirqd_pid(cpu: str) -> int | None:
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if (d / "comm").read_text().strip() == f"ksoftirqd/{cpu}":
                    return int(d.name)
            except OSError:
                pass
    return None


def cpu_busy_ns(cpu: str) -> int:
    """Busy time of one CPU from /proc/stat (everything but idle and iowait)."""
    for line in Path("/proc/stat").read_text().splitlines():
        f = line.split()
        if f[0] == f"cpu{cpu}":
            v = [int(x) for x in f[1:]]
            return (sum(v[:8]) - v[3] - v[4]) * 10_000_000  # USER_HZ = 100
    return 0


def build_loadgen(workdir: Path) -> Path:
    exe = workdir / "loadgen"
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(exe), str(HERE / "loadgen.c"), "-lm"], check=True)
    return exe


def run_point(args: argparse.Namespace, calls: int, mode: str, loadgen: Path, workdir: Path, io: str) -> dict:
    ports = workdir / "ports.txt"
    out_dir = Path(args.out_dir) / f"rtpbench-{os.getpid()}" if args.out_dir != "none" else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    eng = subprocess.Popen(
        [
            "taskset",
            "-c",
            args.engine_cpu,
            sys.executable,
            __file__,
            "_engine",
            "--calls",
            str(calls),
            "--mode",
            mode,
            "--threads",
            str(args.threads),
            "--ports",
            str(ports),
            "--out-dir",
            str(out_dir) if out_dir else "none",
            "--reorder-ms",
            str(args.reorder_ms),
            "--io",
            io,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert eng.stdout and eng.stdin
        line = eng.stdout.readline()
        if not line:  # the engine process could not set the load up (its traceback is on stderr)
            eng.wait(timeout=30)
            raise SetupError(f"the engine could not open {calls} sessions (exit {eng.returncode})")
        ready = json.loads(line)
        relay = 1 if mode == "bridge" else 0
        gen = subprocess.Popen(
            [
                "taskset",
                "-c",
                args.gen_cpu,
                str(loadgen),
                str(ports),
                str(args.seconds),
                str(args.warmup),
                str(relay),
                str(args.sockets),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        ksi = ksoftirqd_pid(args.engine_cpu)

        def received() -> int | None:
            eng.stdin.write("count\n")  # type: ignore[union-attr]
            eng.stdin.flush()  # type: ignore[union-attr]
            return json.loads(eng.stdout.readline())["datagrams"]  # type: ignore[union-attr]

        time.sleep(args.warmup + 0.01)
        c1, k1, b1, t1 = (
            cpu_ns(eng.pid),
            cpu_ns(ksi) if ksi else 0,
            cpu_busy_ns(args.engine_cpu),
            time.monotonic(),
        )
        r1 = received()
        time.sleep(max(0.5, args.seconds - args.warmup - 0.3))
        c2, k2, b2, t2 = (
            cpu_ns(eng.pid),
            cpu_ns(ksi) if ksi else 0,
            cpu_busy_ns(args.engine_cpu),
            time.monotonic(),
        )
        r2 = received()
        rss = rss_kb(eng.pid)
        gen_out = json.loads(gen.communicate(timeout=args.seconds + 30)[0])
        eng.stdin.write("close\n")
        eng.stdin.flush()
        summary = json.loads(eng.stdout.readline())
        eng.wait(timeout=60)
    finally:
        if eng.poll() is None:
            eng.kill()
        if out_dir:
            shutil.rmtree(out_dir, ignore_errors=True)
    window = t2 - t1
    nominal = calls * 2 * 50 * window
    # what the engine really received in the window (RTP of both legs): a generator that fell behind
    # (a busy shared machine) sends fewer packets than nominal, and CPU per packet must not look
    # cheaper for it; older builds without the counter fall back to the nominal rate
    pkts = (r2 - r1) if r1 is not None and r2 is not None and r2 > r1 else nominal
    # the engine's threads, plus the softirq work the kernel pushed to ksoftirqd on the engine's core
    # (deliveries of the engine's own sends on loopback when it is busy)
    cpu = (c2 - c1 + k2 - k1) / 1e9
    us_per_pkt = cpu / pkts * 1e6
    return {
        "mode": mode,
        "calls": calls,
        "threads": args.threads,
        "io": ready["io"],
        "engine_cpu_pct": round(100 * cpu / window, 1),
        "ksoftirqd_pct": round(100 * (k2 - k1) / 1e9 / window, 1),
        "engine_core_busy_pct": round(100 * (b2 - b1) / 1e9 / window, 1),
        "us_per_packet": round(us_per_pkt, 3),
        "received_of_nominal": round(pkts / nominal, 3),
        "us_per_packet_nominal": round(cpu / nominal * 1e6, 3),
        "us_per_call_second": round(us_per_pkt * 100, 1),
        "calls_per_core": int(1e6 / (us_per_pkt * 100)),
        "rss_per_call_kb": round((rss - ready["rss_base_kb"]) / calls, 1),
        "loss_pct": gen_out["loss_pct"] if relay else None,
        "latency_p50_ms": gen_out["latency_p50_ms"] if relay else None,
        "latency_p99_ms": gen_out["latency_p99_ms"] if relay else None,
        "latency_max_ms": gen_out["latency_max_ms"] if relay else None,
        "generator_lag_max_ms": gen_out["generator_lag_max_ms"],
        "generator_cpu_pct": round(100 * gen_out["generator_cpu_s"] / (args.seconds + 0.3), 1),
        "engine_lost": summary.get("lost", 0),
        # the engine's RTP accounting over the whole run (RFC 3550 expected - received, every leg)
        "engine_loss_pct": round(
            100 * summary.get("lost", 0) / max(1, summary.get("lost", 0) + summary.get("packets", 0)), 4
        ),
        "engine_late": summary.get("late", 0),
        "engine_reanchors": summary.get("reanchors", 0),
        "engine_gap_ms_per_leg": round(summary.get("gap_total_ms", 0) / (2 * calls), 1),
        "engine_packets": summary.get("packets", 0),
        "engine_loop": summary.get("loop"),
        "sent": gen_out["sent"],
    }


class SetupError(RuntimeError):
    """A load the engine process could not set up (e.g. the descriptor limit: 5 per session)."""


def relay_mode(mode: str) -> bool:
    return mode == "bridge"


def point_ok(r: dict) -> bool:
    """A load is kept up with: < 0.01 % loss (bridge: of the relayed packets, as the generator saw
    them; record: of the packets sent, as the engine's RTP sequence accounting saw them), the
    engine received >= 99 % of the nominal packets (a generator that falls behind sends fewer),
    relay p99 under 20 ms, and the engine's core not saturated."""
    loss = r["loss_pct"] if r["loss_pct"] is not None else r["engine_loss_pct"]
    return (
        loss < 0.01
        and r["received_of_nominal"] >= 0.99  # else the generator could not send the load
        and (r["latency_p99_ms"] is None or r["latency_p99_ms"] < 20)
        and r["engine_cpu_pct"] < 95
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", default="500,1000", help="comma-separated loads")
    p.add_argument("--mode", choices=["bridge", "record", "both"], default="both")
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sockets", type=int, default=2, help="generator sockets per side")
    p.add_argument("--reorder-ms", type=int, default=100)
    p.add_argument(
        "--io",
        default="auto",
        help="the engine's receive path: auto, packet, io_uring or epoll; several, comma-separated, "
        "are run interleaved (each round runs each once) and compared by their medians",
    )
    p.add_argument("--rounds", type=int, default=1, help="runs of each receive path per load")
    p.add_argument(
        "--out-dir", default="/dev/shm", help="where WAVs go (tmpfs by default); 'none' = relay only"
    )
    p.add_argument("--engine-cpu", default="0")
    p.add_argument("--gen-cpu", default="1")
    p.add_argument(
        "--find-max", action="store_true", help="raise the load until loss >= 0.01 %% or late relay"
    )
    p.add_argument("--json", help="append results (JSON lines) to this file")
    args = p.parse_args()
    ios = args.io.split(",")
    if any(io not in ("auto", "packet", "io_uring", "epoll") for io in ios) or args.rounds < 1:
        p.error("--io takes auto, packet, io_uring, epoll (comma-separated); --rounds >= 1")
    if args.find_max and (len(ios) > 1 or args.rounds > 1):
        p.error("--find-max runs one receive path once per load")
    modes = ["bridge", "record"] if args.mode == "both" else [args.mode]
    print(f"machine: {machine()}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        loadgen = build_loadgen(Path(tmp))
        for mode in modes:
            loads = [int(x) for x in args.calls.split(",")]
            if args.find_max:
                loads = list(range(1000, 10001, 500))
            last_ok = None
            for calls, io in ((c, io) for c in loads for _ in range(args.rounds) for io in ios):
                try:
                    r = run_point(args, calls, mode, loadgen, Path(tmp), io)
                except SetupError as exc:
                    if not args.find_max:
                        raise
                    print(
                        f"find_max_{mode}: {last_ok['calls'] if last_ok else 0} calls or more "
                        f"({calls}: {exc}; the machine, not the engine's CPU, was the limit)",
                        flush=True,
                    )
                    break
                r["io_requested"] = io
                results.append(r)
                print(json.dumps(r), flush=True)
                if args.json:
                    with open(args.json, "a") as f:
                        f.write(json.dumps(r) + "\n")
                ok = point_ok(r)
                if args.find_max and ok:
                    last_ok = r
                if args.find_max and not ok:
                    # who could not keep up: the engine's core, or the generator's
                    who = "engine" if r["engine_cpu_pct"] >= 90 else "generator"
                    if who == "engine" and r["generator_cpu_pct"] >= 90:
                        who = "both"
                    print(
                        f"find_max_{mode}: {last_ok['calls'] if last_ok else 0} calls "
                        f"({calls} failed: loss {r['loss_pct'] if relay_mode(mode) else r['engine_loss_pct']} %, "
                        f"engine core {r['engine_cpu_pct']} %, generator core {r['generator_cpu_pct']} %, "
                        f"generator lag {r['generator_lag_max_ms']} ms: the {who} was the limit)",
                        flush=True,
                    )
                    break
    if len(ios) > 1 or args.rounds > 1:
        compare(results, ios)
    for mode in modes:
        # the headline: the first receive path at the largest load, median of its runs
        rs = [r for r in results if r["mode"] == mode and r["io_requested"] == ios[0]]
        if not rs:
            continue
        top = max(r["calls"] for r in rs)
        us = statistics.median(r["us_per_packet"] for r in rs if r["calls"] == top)
        name = "bridged_recorded" if mode == "bridge" else "record_only"
        print(f"{name}_us_per_packet: {round(us, 3)}")
        print(f"{name}_calls_per_core: {int(1e6 / (us * 100))}")


def compare(results: list[dict], ios: list[str]) -> None:
    """Median CPU per packet of each receive path per load, its runs, and its ratio to the first."""
    for mode, calls in sorted({(r["mode"], r["calls"]) for r in results}):
        base = None
        for io in ios:
            runs = [
                r["us_per_packet"]
                for r in results
                if (r["mode"], r["calls"], r["io_requested"]) == (mode, calls, io)
            ]
            if not runs:
                continue
            med = statistics.median(runs)
            base = base or med
            print(
                f"compare {mode} {calls} calls, {io}: median {med:.2f} us per packet "
                f"(runs {', '.join(f'{x:.2f}' for x in runs)}), {med / base:.2f}x {ios[0]}, "
                f"{int(1e6 / (med * 100))} calls per core",
                flush=True,
            )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_engine":
        ep = argparse.ArgumentParser()
        ep.add_argument("_cmd")
        ep.add_argument("--calls", type=int)
        ep.add_argument("--mode")
        ep.add_argument("--threads", type=int)
        ep.add_argument("--ports")
        ep.add_argument("--out-dir")
        ep.add_argument("--reorder-ms", type=int)
        ep.add_argument("--io", default="auto")
        engine_main(ep.parse_args())
    else:
        main()
