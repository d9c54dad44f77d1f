"""End-to-end call-rate benchmark: SIPp calls through the real stack, every recording checked.

Starts a lab (every daemon its own process, as `callvault lab` and the system tests run them) in a
temporary directory on free ports, registers a SIPp UAS (`uas_echo.xml -rtp_echo`) as 1003, and
places calls from a SIPp UAC (`uac_pcap_auth.xml`: digest-authenticated INVITE, G.711 A-law RTP from
the pcap, BYE after --hold-ms) as 1004 at a series of rates. A step passes when SIPp reports every
call successful AND every call's recording is indexed by Web Services within --index-timeout seconds
with a duration within --duration-tolerance of the hold time. The sweep stops at the first failing
step; then one concurrency step holds --conc-calls calls for --conc-hold-ms each (in a fresh lab).

Per step: calls attempted / succeeded / failed (SIPp's stat CSV, failure counters by kind), the
achieved answer rate and INVITE->200 setup time percentiles (SIPp -trace_rtt, timer from the first
INVITE to the 200, so it includes the digest challenge round trip), recordings indexed vs expected
and how long after the last BYE the last one appeared, duration errors, peak concurrent calls (SIPp's
CurrentCall, sampled every second), and per daemon the CPU seconds per call (utime + stime from
/proc/<pid>/stat, all threads; the MCP's include rtp_core's engine thread) and its CPU use in % of
one core (mean over the call window and peak 1 s sample). The load generator (SIPp) runs on the
same machine and its CPU is reported too, as is the CPU used by everything else (machine busy time
from /proc/stat minus the lab and SIPp): other people's work on a shared machine shows up there.

    .venv/bin/python bench/call_rate.py                       # default sweep, writes docs/BENCHMARKS.md
    .venv/bin/python bench/call_rate.py --rates 20,40 --seconds 5 --no-conc --no-doc
    .venv/bin/python bench/call_rate.py --repeat 3            # medians over 3 sweeps (fresh lab each)

Writes its section of docs/BENCHMARKS.md (between `<!-- BEGIN call_rate -->` and
`<!-- END call_rate -->`, appended if absent; nothing else in the file is touched) unless --no-doc.
Ends with one `name: value` line per headline figure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import resource
import secrets
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.lab import Lab, LabPorts  # noqa: E402
from tests.helpers.sipp import Sipp, start_registered_uas  # noqa: E402

DOC = ROOT / "docs" / "BENCHMARKS.md"
IDLE_S = 3.0
BEGIN = "<!-- BEGIN call_rate -->"
END = "<!-- END call_rate -->"
CLK_TCK = os.sysconf("SC_CLK_TCK")
CALLEE, CALLER = "1003", "1004"
# Display order and short names of the lab's daemons (labels of Lab.daemons).
DAEMONS = ["sip-server-a", "resource-manager", "mcp1", "mcp2", "recording-processor", "web-services"]
SHORT = {
    "sip-server-a": "SIP",
    "resource-manager": "RM",
    "mcp": "MCP",
    "mcp1": "MCP1",
    "mcp2": "MCP2",
    "recording-processor": "RP",
    "web-services": "WS",
    "sipp": "SIPp",
}


# ---- CPU accounting ---------------------------------------------------------------------------


def proc_cpu_s(pid: int | None) -> float | None:
    """utime + stime of a process (all its threads), in seconds; None if it is gone."""
    if pid is None:
        return None
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of proc(5)


def machine_busy_s() -> float:
    """CPU seconds the whole machine was busy (all cores), from /proc/stat."""
    parts = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    vals = [int(v) for v in parts[:8]]  # user nice system idle iowait irq softirq steal
    return (sum(vals) - vals[3] - vals[4]) / CLK_TCK


def children_cpu_s() -> float:
    """CPU of this process's reaped children (the SIPp UACs once they exited)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


class CpuMeter:
    """CPU seconds of a set of processes (label -> pid) and of the machine, snapshot by snapshot."""

    def __init__(self, pids: dict[str, int | None]) -> None:
        self.pids = dict(pids)

    def snapshot(self) -> dict[str, float]:
        snap = {"_t": time.monotonic(), "_machine": machine_busy_s(), "_children": children_cpu_s()}
        for label, pid in self.pids.items():
            cpu = proc_cpu_s(pid)
            if cpu is not None:
                snap[label] = cpu
        return snap


def cpu_delta(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: b[k] - a[k] for k in b if k in a}


def udp_drops() -> dict[int, int]:
    """Datagrams the kernel dropped per local UDP port (receive buffer full), from /proc/net/udp."""
    out: dict[int, int] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
            f = line.split()
            with contextlib.suppress(ValueError, IndexError):
                port = int(f[1].split(":")[1], 16)
                out[port] = out.get(port, 0) + int(f[12])
    return out


async def sample_cpu(
    meter: CpuMeter,
    samples: list[dict[str, float]],
    drops_seen: dict[int, int],
    watch: set[int],
    interval: float = 1.0,
) -> None:
    """Append a per-interval CPU utilisation (% of one core) per label every ``interval`` s, and keep
    the latest drop count of the ``watch``ed UDP ports (sockets that close during the step)."""
    prev = meter.snapshot()
    while True:
        await asyncio.sleep(interval)
        cur = meter.snapshot()
        dt = cur["_t"] - prev["_t"]
        d = cpu_delta(prev, cur)
        samples.append({k: 100 * v / dt for k, v in d.items() if not k.startswith("_t")})
        drops = udp_drops()
        for port in watch:
            if port in drops:
                drops_seen[port] = drops[port]
        prev = cur


# ---- the API ----------------------------------------------------------------------------------


class Api:
    """Search of the lab's Web Services API as one tenant."""

    def __init__(self, base_url: str, api_key: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key

    def _get(self, path: str) -> Any:
        req = urllib.request.Request(self.base_url + path)
        req.add_header("Authorization", f"Bearer {self.api_key}")
        with urllib.request.urlopen(req, timeout=15) as resp:
            return json.loads(resp.read())

    def search(self, **filters: str) -> list[dict[str, Any]]:
        query = urllib.parse.urlencode(filters)
        items: list[dict[str, Any]] = []
        cursor = None
        while True:
            path = f"/recordings?limit=500&{query}"
            if cursor:
                path += "&cursor=" + urllib.parse.quote(cursor)
            page = self._get(path)
            items += page["items"]
            cursor = page.get("next")
            if not cursor:
                return items


# ---- one step ---------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def read_rtt(workdir: Path) -> list[tuple[float, float]]:
    """(ms since SIPp start, INVITE->200 ms) per call from SIPp's -trace_rtt file."""
    out = []
    for path in workdir.glob("*_rtt.csv"):
        for line in path.read_text(errors="replace").splitlines()[1:]:
            parts = line.split(";")
            with contextlib.suppress(ValueError, IndexError):
                out.append((float(parts[0]), float(parts[1])))
    return sorted(out)


def stat_rows(workdir: Path) -> list[dict[str, str]]:
    lines = [ln for ln in (workdir / "stat.csv").read_text(errors="replace").splitlines() if ln.strip()]
    if len(lines) < 2:
        return []
    header = lines[0].split(";")
    return [dict(zip(header, ln.split(";"), strict=False)) for ln in lines[1:]]


def sipp_error_kinds(errors: str, keep: int = 3) -> list[str]:
    """The kinds of errors in SIPp's errors.log, most frequent first: "N x <what happened>"."""
    kinds: dict[str, int] = {}
    for m in re.finditer(r"\d+\.\d+: (.+?)(?:\n|$)", errors):
        text = re.sub(r"Call-Id '[^']*'", "Call-Id X", m.group(1))
        text = re.sub(r"(received 'SIP/2.0 \d+ [^\r\n']*|received '\w+ ).*", r"\1'", text)
        text = re.sub(r"Dead call \S+", "Dead call X", text)[:160]
        kinds[text] = kinds.get(text, 0) + 1
    # messages for calls SIPp had already aborted ("Dead call") are consequences: list them last
    order = sorted(kinds.items(), key=lambda kv: (kv[0].startswith("Dead call"), -kv[1]))
    return [f"{n} x {k}" for k, n in order[:keep]]


def log_offsets(lab: Lab) -> dict[str, int]:
    out = {}
    for label, d in lab.daemons.items():
        try:
            out[label] = d.log_path.stat().st_size
        except OSError:
            out[label] = 0
    return out


PROBLEM = re.compile(r" (WARNING|ERROR|CRITICAL) |Traceback")


def log_problems(lab: Lab, offsets: dict[str, int], keep: int = 4) -> dict[str, dict[str, Any]]:
    """Per daemon: how many WARNING/ERROR lines were logged since ``offsets``, and a few distinct ones."""
    out: dict[str, dict[str, Any]] = {}
    for label, d in lab.daemons.items():
        try:
            with open(d.log_path, "rb") as f:
                f.seek(offsets.get(label, 0))
                text = f.read().decode(errors="replace")
        except OSError:
            continue
        lines = [ln for ln in text.splitlines() if PROBLEM.search(ln)]
        if not lines:
            continue
        distinct: dict[str, str] = {}
        for ln in lines:
            # the same message for different calls: key on the text without timestamp and ids
            key = re.sub(r"[0-9a-f]{8,}|\d+", "#", ln[24:])
            distinct.setdefault(key, ln)
        out[label] = {"count": len(lines), "examples": list(distinct.values())[:keep]}
    return out


async def run_step(
    lab: Lab,
    api: Api,
    meter: CpuMeter,
    sip_addr: str,
    password: str,
    *,
    name: str,
    rate: float,
    calls: int,
    hold_ms: int,
    workdir: Path,
    index_timeout: float,
    tolerance: float,
    min_answered: float = 0.9,
    uas: Sipp | None = None,
) -> dict[str, Any]:
    offsets = log_offsets(lab)
    start_after = (datetime.now(UTC) - timedelta(seconds=2)).isoformat()
    samples: list[dict[str, float]] = []
    drops0 = udp_drops()
    drops_seen: dict[int, int] = {}
    uac = Sipp(
        "uac_pcap_auth.xml",
        workdir=workdir,
        remote=sip_addr,
        service=CALLEE,
        user=CALLER,
        auth=(CALLER, password),
        rate=rate,
        max_calls=calls,
        limit=calls,
        duration_ms=hold_ms,
        trace_messages=False,
        extra_args=["-trace_rtt", "-rtt_freq", "1"],
    )
    # (the UAC never reads the RTP relayed back to it: drops on its media port are expected)
    watch = {uac.local_port}
    c0 = meter.snapshot()
    sampler = asyncio.create_task(sample_cpu(meter, samples, drops_seen, watch))
    await uac.start()
    assert uac.process is not None
    uac_pid = uac.process.pid
    meter.pids["sipp-uac"] = uac_pid
    active_s = calls / rate + hold_ms / 1000  # placing calls and holding the last one
    try:
        # Calls that fail under overload can linger for SIP's 32 s timers: do not wait for them.
        result = await uac.wait(timeout=active_s + 20)
    except Exception as exc:
        print(f"  SIPp did not finish in time, stopped: {str(exc).splitlines()[0][:200]}", flush=True)
        result = uac.result or await uac.stop()
    meter.pids.pop("sipp-uac", None)
    c1 = meter.snapshot()

    # Recordings of this step: this SIPp's Call-IDs are "<n>-<pid>@<ip>".
    suffix = f"-{uac_pid}@"
    recs: list[dict[str, Any]] = []
    deadline = time.monotonic() + index_timeout
    index_lag = None
    while True:
        try:
            found = await asyncio.to_thread(api.search, party=CALLER, start_after=start_after)
            recs = [r for r in found if suffix in r.get("call_id", "")]
        except (OSError, urllib.error.URLError, ValueError) as exc:
            print(f"  API search failed: {exc}", flush=True)
        if len(recs) >= result.successful + result.failed or len(recs) >= calls:
            index_lag = time.monotonic() - c1["_t"]
            break
        if time.monotonic() > deadline or (result.failed and time.monotonic() > deadline - index_timeout + 5):
            break
        await asyncio.sleep(0.5)
    c2 = meter.snapshot()
    sampler.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await sampler

    # SIPp figures
    rows = stat_rows(workdir)
    final = result.stats
    failures = {
        k[6:-3]: int(float(v))
        for k, v in final.items()
        if k.startswith("Failed") and k.endswith("(C)") and k != "FailedCall(C)" and v not in ("", "0")
    }
    attempted = int(float(final.get("OutgoingCall(C)", 0) or 0))
    peak_concurrent = max((int(float(r.get("CurrentCall", 0) or 0)) for r in rows), default=0)
    rtt = read_rtt(workdir)
    setup = [ms for _, ms in rtt]
    answered_rate = None
    if len(rtt) > 1 and rtt[-1][0] > rtt[0][0]:
        answered_rate = (len(rtt) - 1) / ((rtt[-1][0] - rtt[0][0]) / 1000)

    # Recordings
    expected = hold_ms / 1000
    errors = [abs(r["duration"] - expected) for r in recs]
    duration_bad = [r for r in recs if abs(r["duration"] - expected) > tolerance]
    lost = sum(s.get("lost", 0) for r in recs for s in r.get("streams", []))
    per_mcp: dict[str, int] = {}
    for r in recs:
        per_mcp[r.get("mcp", "?")] = per_mcp.get(r.get("mcp", "?"), 0) + 1

    # CPU per call: over the whole step (calls, teardown, indexing). Utilisation: the 1 s samples
    # of the active phase (placing calls until the last one's hold ends), mean and peak.
    whole = cpu_delta(c0, c2)
    cpu_s = {label: whole.get(label, 0.0) for label in DAEMONS}
    cpu_s["mcp"] = cpu_s["mcp1"] + cpu_s["mcp2"]
    cpu_s["sipp"] = whole.get("_children", 0.0) + whole.get("sipp-uas", 0.0)  # the UAC was reaped
    active = samples[: max(1, round(active_s))]
    for smp in active:
        smp["sipp"] = smp.get("sipp-uac", 0.0) + smp.get("sipp-uas", 0.0)
    labels = [*DAEMONS, "sipp"]
    util = {k: statistics.fmean([smp.get(k, 0.0) for smp in active]) if active else 0.0 for k in labels}
    peak = {k: max((smp.get(k, 0.0) for smp in active), default=0.0) for k in labels}
    machine_pct = statistics.fmean([smp.get("_machine", 0.0) for smp in active]) if active else 0.0
    ours_pct = sum(util[k] for k in labels)
    n = max(1, result.successful)

    # Datagrams dropped by the kernel (receive buffer full) on the SIP sockets and SIPp's media ports
    drops1 = udp_drops()
    cfg = lab.config
    sockets = {"sip-server-a": cfg.sip_server.port, "resource-manager": cfg.resource_manager.port}
    sockets.update({m.name: m.port for m in cfg.mcp})
    if uas is not None:
        sockets["sipp-uas"] = uas.local_port
    udp_dropped = {k: drops1.get(p, 0) - drops0.get(p, 0) for k, p in sockets.items()}
    if uas is not None:
        udp_dropped["sipp-uas-rtp"] = sum(
            drops1.get(p, 0) - drops0.get(p, 0) for p in (uas.media_port, uas.media_port + 2)
        )
    udp_dropped["sipp-uac"] = drops_seen.get(uac.local_port, 0)
    udp_dropped = {k: v for k, v in udp_dropped.items() if v}
    dead = [label for label, d in lab.daemons.items() if not d.alive()]
    # A step shorter than the backlog it builds can end before calls fail: the answers must keep pace.
    keeps_up = answered_rate is None or answered_rate >= min_answered * rate
    passed = (
        keeps_up
        and result.failed == 0
        and attempted == calls
        and result.successful == calls
        and len(recs) == calls
        and not duration_bad
        and not dead
    )
    return {
        "name": name,
        "rate": rate,
        "calls": calls,
        "hold_ms": hold_ms,
        "attempted": attempted,
        "succeeded": result.successful,
        "failed": result.failed,
        "sipp_rc": result.returncode,
        "failures": failures,
        "answered_per_s": round(answered_rate, 1) if answered_rate else None,
        "keeps_up": keeps_up,
        "setup_ms": {
            "p50": percentile(setup, 50),
            "p95": percentile(setup, 95),
            "p99": percentile(setup, 99),
            "max": max(setup) if setup else None,
        },
        "indexed": len(recs),
        "index_lag_s": round(index_lag, 1) if index_lag is not None else None,
        "duration_err_max_s": round(max(errors), 3) if errors else None,
        "duration_bad": len(duration_bad),
        "rtp_lost_packets": lost,
        "per_mcp": per_mcp,
        "peak_concurrent": peak_concurrent,
        "offered_concurrent": round(rate * hold_ms / 1000),
        "cpu_ms_per_call": {k: round(1000 * v / n, 2) for k, v in cpu_s.items()},
        "cpu_pct_mean": {k: round(v, 1) for k, v in util.items()},
        "cpu_pct_peak": {k: round(v, 1) for k, v in peak.items()},
        "machine_busy_pct": round(machine_pct, 1),
        "other_pct": round(max(0.0, machine_pct - ours_pct), 1),
        "window_s": round(c1["_t"] - c0["_t"], 1),
        "active_s": round(active_s, 1),
        "udp_dropped": udp_dropped,
        "unfinished": max(0, attempted - result.successful - result.failed),
        "dead": dead,
        "log_problems": log_problems(lab, offsets),
        "sipp_errors": sipp_error_kinds(result.errors),
        "passed": passed,
    }


def print_step(r: dict[str, Any]) -> None:
    s = r["setup_ms"]
    fmt = lambda v: "-" if v is None else f"{v:.0f}"  # noqa: E731
    print(
        f"  {r['name']}: {r['succeeded']}/{r['attempted']} ok, {r['failed']} failed {r['failures'] or ''}; "
        f"answered {r['answered_per_s']}/s; setup p50/p95/p99/max {fmt(s['p50'])}/{fmt(s['p95'])}/"
        f"{fmt(s['p99'])}/{fmt(s['max'])} ms; indexed {r['indexed']}/{r['calls']} "
        f"(+{r['index_lag_s']} s), duration err max {r['duration_err_max_s']} s ({r['duration_bad']} bad); "
        f"peak concurrent {r['peak_concurrent']}; RTP lost {r['rtp_lost_packets']}",
        flush=True,
    )
    cpu = r["cpu_ms_per_call"]
    mean = r["cpu_pct_mean"]
    peak = r["cpu_pct_peak"]
    parts = [
        f"{SHORT[k]} {cpu[k]:.1f} ms/call {mean[k]:.0f}%/{peak[k]:.0f}%"
        for k in DAEMONS
        if k in cpu and k in mean
    ]
    print(
        "    CPU (per call, mean/peak % of a core): "
        + ", ".join(parts)
        + f"; SIPp {cpu['sipp']:.1f} ms/call "
        f"{mean['sipp']:.0f}%; machine {r['machine_busy_pct']:.0f}% of {os.cpu_count()} cores, "
        f"other {r['other_pct']:.0f}%",
        flush=True,
    )
    for kind in r["sipp_errors"]:
        print(f"    SIPp: {kind}", flush=True)
    if r["udp_dropped"]:
        print(
            f"    UDP datagrams dropped by the kernel (receive buffer full): {r['udp_dropped']}", flush=True
        )
    if r["unfinished"]:
        print(f"    {r['unfinished']} calls still running when SIPp was stopped", flush=True)
    for label, p in r["log_problems"].items():
        print(f"    {label}: {p['count']} warning/error lines, e.g.", flush=True)
        for ln in p["examples"]:
            print(f"      {ln[:300]}", flush=True)
    if r["dead"]:
        print(f"    DEAD daemons: {r['dead']}", flush=True)
    print(f"    -> {'PASS' if r['passed'] else 'FAIL'}", flush=True)


# ---- a lab with a registered callee -------------------------------------------------------------


class Bench:
    """A fresh lab in ``workdir`` with the callee registered (the UAS echoing RTP)."""

    def __init__(self, workdir: Path, max_concurrent: int) -> None:
        self.workdir = workdir
        ports = LabPorts.free()
        # RTP ports: 4 per call (two legs, RTP + RTCP), calls spread over two MCPs; keep them above
        # the range tests/helpers/sipp.py picks SIPp ports from and within the kernel's port space.
        ports.rtp_per_mcp = max(1000, (4 * max_concurrent * 3 // 2 + 99) // 100 * 100)
        ports.rtp_base = 40000 + secrets.randbelow(20) * 100
        self.lab = Lab(workdir / "lab", ports=ports, fresh=True)
        self.uas: Sipp | None = None

    async def __aenter__(self) -> Bench:
        await asyncio.to_thread(self.lab.start)
        info = self.lab.info()
        self.sip_addr = f"{info['sip']['host']}:{info['sip']['port']}"
        self.passwords = {u["extension"]: u["password"] for u in info["users"]}
        self.api = Api(info["api"]["base_url"], info["api"]["api_key"])
        self.uas = await start_registered_uas(
            "uas_echo.xml",
            self.sip_addr,
            CALLEE,
            self.passwords[CALLEE],
            workdir=self.workdir / "uas",
            rtp_echo=True,
            trace_messages=False,
            limit=10000,
        )
        assert self.uas.process is not None
        pids: dict[str, int | None] = {label: d.pid for label, d in self.lab.daemons.items()}
        pids["sipp-uas"] = self.uas.process.pid
        self.meter = CpuMeter(pids)
        # What the lab burns with no calls (RM's OPTIONS probes, timers), for comparison.
        a = self.meter.snapshot()
        await asyncio.sleep(IDLE_S)
        d = cpu_delta(a, self.meter.snapshot())
        self.idle_pct = {label: round(100 * d.get(label, 0.0) / d["_t"], 1) for label in DAEMONS}
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            if self.uas is not None:
                await self.uas.stop()
        finally:
            await asyncio.to_thread(self.lab.stop)

    async def step(self, name: str, rate: float, calls: int, hold_ms: int, args: argparse.Namespace) -> Any:
        r = await run_step(
            self.lab,
            self.api,
            self.meter,
            self.sip_addr,
            self.passwords[CALLER],
            name=name,
            rate=rate,
            calls=calls,
            hold_ms=hold_ms,
            workdir=self.workdir / name,
            index_timeout=args.index_timeout,
            tolerance=args.duration_tolerance,
            min_answered=args.min_answered,
            uas=self.uas,
        )
        r["idle_pct"] = self.idle_pct
        print_step(r)
        return r


# ---- the run ----------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    sipp = "?"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["sipp", "-v"], capture_output=True, text=True, timeout=5).stdout
        m = re.search(r"SIPp v?([\w.\-]+)", out)
        sipp = m.group(1).rstrip(".") if m else "?"
    return {
        "cpu": model,
        "cores": str(os.cpu_count()),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "sipp": sipp,
        "os": _os_name(),
    }


def _os_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    return platform.system()


def other_processes(exclude: set[int]) -> list[str]:
    """The busiest processes that are not ours (a hint of what else loads the machine)."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["ps", "-eo", "pid,pcpu,args", "--sort=-pcpu", "--no-headers"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout
        rows = []
        for line in out.splitlines():
            pid, pcpu, cmd = [*line.split(None, 2), "", ""][:3]
            if int(pid) in exclude or float(pcpu) < 5:
                continue
            rows.append(f"{cmd[:70]} ({pcpu}%)")
        return rows[:5]
    return []


def bottleneck(step: dict[str, Any]) -> str:
    """The daemon with the highest mean CPU in a step, with the machine's state."""
    mean = step["cpu_pct_mean"]
    label = max(DAEMONS, key=lambda k: mean.get(k, 0.0))
    cores = os.cpu_count() or 1
    machine_pct = step["machine_busy_pct"]
    text = f"{label} ({mean[label]:.0f}% of a core mean, {step['cpu_pct_peak'][label]:.0f}% peak)"
    if machine_pct > 85 * cores:
        text += f"; the machine was saturated ({machine_pct:.0f}% of {cores} cores busy)"
    return text


def med(values: list[Any]) -> Any:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return statistics.median(vals)


async def sweep(args: argparse.Namespace, workdir: Path, rep: int) -> dict[str, Any]:
    rates = [float(x) for x in args.rates.split(",")]
    steps: list[dict[str, Any]] = []
    max_conc = int(max(rates) * (args.hold_ms / 1000 + 2))
    async with Bench(workdir / f"rates{rep}", max_conc) as bench:
        for rate in rates:
            calls = args.calls or int(rate * args.seconds)
            print(f"[run {rep}] {rate:g} calls/s x {calls} calls, hold {args.hold_ms} ms", flush=True)
            r = await bench.step(f"rate{rate:g}", rate, calls, args.hold_ms, args)
            steps.append(r)
            if not r["passed"]:
                break
            await asyncio.sleep(args.settle)
    conc = None
    if not args.no_conc:
        async with Bench(workdir / f"conc{rep}", args.conc_calls) as bench:
            print(
                f"[run {rep}] concurrency: {args.conc_calls} calls at {args.conc_rate:g}/s, "
                f"hold {args.conc_hold_ms} ms",
                flush=True,
            )
            conc = await bench.step("concurrency", args.conc_rate, args.conc_calls, args.conc_hold_ms, args)
    passed = [s["rate"] for s in steps if s["passed"]]
    return {"steps": steps, "conc": conc, "highest_passing": max(passed) if passed else 0}


def merge_steps(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of a step's figures over repeats (counts: the worst)."""
    out = dict(steps[0])
    out["runs"] = len(steps)
    out["passed_runs"] = sum(1 for s in steps if s["passed"])
    out["succeeded"] = min(s["succeeded"] for s in steps)
    out["failed"] = max(s["failed"] for s in steps)
    out["indexed"] = min(s["indexed"] for s in steps)
    out["duration_bad"] = max(s["duration_bad"] for s in steps)
    out["duration_err_max_s"] = med([s["duration_err_max_s"] for s in steps])
    for key in ("answered_per_s", "index_lag_s", "peak_concurrent", "machine_busy_pct", "other_pct"):
        out[key] = med([s[key] for s in steps])
    for key in ("setup_ms", "cpu_ms_per_call", "cpu_pct_mean", "cpu_pct_peak"):
        out[key] = {k: med([s[key].get(k) for s in steps]) for k in steps[0][key]}
    return out


def fmt(v: Any, nd: int = 0) -> str:
    if v is None:
        return "-"
    return f"{v:,.{nd}f}"


TABLE_HEAD = [
    "| calls/s | calls x hold | ok / failed | answered/s | setup p50 / p95 / p99 ms | recordings indexed "
    "(lag) | max duration error | peak concurrent | CPU ms per call: SIP / RM / MCP (both) / RP / WS / "
    "SIPp | busiest daemon (mean % of a core); machine, other | result |",
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
]


def step_row(s: dict[str, Any]) -> str:
    cpu = s["cpu_ms_per_call"]
    mean = s["cpu_pct_mean"]
    peak = s["cpu_pct_peak"]
    setup = s["setup_ms"]
    top = max(DAEMONS, key=lambda k: mean.get(k) or 0.0)
    runs = f" ({s['passed_runs']} of {s['runs']} runs passed)" if s.get("runs", 1) > 1 else ""
    if s.get("of_runs", 1) > s.get("runs", 1):
        runs = f" (reached in {s.get('runs', 1)} of {s['of_runs']} runs, {s['passed_runs']} passed)"
    return (
        f"| {fmt(s['rate'])} | {s['calls']} x {s['hold_ms'] / 1000:g} s | {s['succeeded']} / {s['failed']} | "
        f"{fmt(s['answered_per_s'])} | {fmt(setup['p50'])} / {fmt(setup['p95'])} / {fmt(setup['p99'])} | "
        f"{s['indexed']}/{s['calls']} "
        f"({'+' + fmt(s['index_lag_s'], 1) + ' s' if s['index_lag_s'] is not None else 'gave up'}) | "
        f"{fmt(s['duration_err_max_s'], 2)} s ({s['duration_bad']} bad) | {fmt(s['peak_concurrent'])} | "
        f"{fmt(cpu['sip-server-a'], 1)} / {fmt(cpu['resource-manager'], 1)} / {fmt(cpu['mcp'], 1)} / "
        f"{fmt(cpu['recording-processor'], 1)} / {fmt(cpu['web-services'], 1)} / {fmt(cpu['sipp'], 1)} | "
        f"{SHORT[top]} {fmt(mean[top])} % ({fmt(peak[top])} % peak); machine {fmt(s['machine_busy_pct'])} %, "
        f"other {fmt(s['other_pct'])} % | {'pass' if s['passed_runs'] == s.get('runs', 1) else 'FAIL'}{runs} |"
    )


def headlines(runs: list[dict[str, Any]]) -> dict[str, Any]:
    highest = med([r["highest_passing"] for r in runs])
    out: dict[str, Any] = {"sip_calls_per_second_sustained": highest}
    at = [s for r in runs for s in r["steps"] if s["rate"] == highest and s["passed"]]
    if at:
        out["call_setup_ms_p95_at_sustained"] = round(med([s["setup_ms"]["p95"] for s in at]), 1)
        for label, name in (("sip-server-a", "sip_server"), ("resource-manager", "resource_manager")):
            out[f"{name}_cpu_ms_per_call"] = round(med([s["cpu_ms_per_call"][label] for s in at]), 2)
        out["mcp_cpu_ms_per_call"] = round(med([s["cpu_ms_per_call"]["mcp"] for s in at]), 2)
        lab_ms = med([sum(s["cpu_ms_per_call"][k] for k in DAEMONS) for s in at])
        out["stack_cpu_ms_per_call"] = round(lab_ms, 1)
        # what the stack alone could place if it had every core (no SIPp, nobody else): an estimate
        out["sip_calls_per_second_cpu_ceiling"] = int((os.cpu_count() or 1) * 1000 / lab_ms)
    concs = [r["conc"] for r in runs if r["conc"]]
    if concs:
        ok = [c for c in concs if c["passed"]]
        out["concurrent_recorded_calls_held"] = (
            int(med([c["peak_concurrent"] for c in ok])) if len(ok) == len(concs) else 0
        )
    failing = [s for r in runs for s in r["steps"] if not s["passed"]]
    if failing:
        out["call_rate_bottleneck"] = max(
            DAEMONS, key=lambda k: med([s["cpu_pct_mean"][k] for s in failing]) or 0
        )
        if any(s["machine_busy_pct"] > 85 * (os.cpu_count() or 1) for s in failing):
            out["call_rate_bottleneck"] += " (machine CPU saturated)"
    return out


def render_doc(args: argparse.Namespace, runs: list[dict[str, Any]], mach: dict[str, str], meta: dict) -> str:
    rates = sorted({s["rate"] for r in runs for s in r["steps"]})
    merged = [merge_steps([s for r in runs for s in r["steps"] if s["rate"] == rate]) for rate in rates]
    for m in merged:
        m["of_runs"] = len(runs)
    heads = headlines(runs)
    failing = [s for r in runs for s in r["steps"] if not s["passed"]]
    lines = [
        BEGIN,
        "## End to end: SIP call rate and concurrent recorded calls (bench/call_rate.py)",
        "",
        "**Command** (from the repository root; `make bench` runs it through `bench/run_all.py` without",
        "touching this file):",
        "```",
        meta["command"],
        "```",
        "The whole stack runs as in `callvault lab` (every daemon its own process, two MCPs, on loopback",
        "in a temporary directory). A SIPp UAS registered as 1003 answers and echoes RTP (`uas_echo.xml",
        "-rtp_echo`); a SIPp UAC calls it as 1004 (`uac_pcap_auth.xml`: INVITE, 401 digest challenge,",
        "INVITE with credentials, PCMA RTP from SIPp's `g711a.pcap`, BYE after the hold time). Each step",
        "places `rate x seconds` calls; it **passes** only if SIPp counts every call successful, every",
        f"call's recording is found through the REST API within {args.index_timeout:g} s of the last BYE,",
        f"every recording's duration is within {args.duration_tolerance:g} s of the hold time, and the",
        f"calls are answered at >= {args.min_answered:g} x the offered rate (a short step can otherwise",
        "end before the backlog it builds makes calls fail). The sweep stops at the first failing step;",
        "then the concurrency step runs in a fresh lab.",
        "- *setup* = SIPp's response time from the first INVITE to the 200 (so it includes the digest",
        "  challenge round trip and the B2BUA's whole path: RM, MCP, callee), from `-trace_rtt`.",
        "- *CPU ms per call* = utime + stime of each daemon process (`/proc/<pid>/stat`, all threads: the",
        "  MCP figure includes rtp_core's engine thread relaying and recording the RTP) over the step,",
        "  indexing included, divided by the calls; *mean/peak %* = CPU in % of one core, mean and",
        "  busiest of the 1 s samples of the active phase (from the first INVITE until the last call's",
        "  hold ends). Every daemon is a single-threaded asyncio process, so",
        "  ~100 % of a core is its ceiling. *machine* = all cores' busy time (`/proc/stat`, 100 % = one",
        "  core), *other* = machine minus the lab and SIPp (other people's work on the shared machine).",
        "- SIPp (the load generator: both ends of every call, one pcap-playing thread per call) runs on",
        "  the same 2 cores, so the stack gets what SIPp and everything else leave.",
        "",
        f"**Machine**: {mach['cpu']} ({mach['cores']} vCPUs), Linux {mach['kernel']}, {mach['os']}, "
        f"Python {mach['python']}, SIPp {mach['sipp']}. Measured {meta['date']}. **Shared and noisy**: the",
        "two cores were shared with other engineers' builds and test suites during the runs (load",
        f"average {meta['load_before']} before the run; the *other* column shows their CPU during each",
        f"step{'; busiest other processes seen: ' + '; '.join(meta['others']) if meta['others'] else ''}).",
        f"Figures are medians over {len(runs)} run(s) of the sweep, each in a fresh lab (the whole",
        f"command took {meta.get('minutes', '?')} min); call and recording counts are the worst run's.",
        "",
        *TABLE_HEAD,
    ]
    lines += [step_row(s) for s in merged]
    concs = [r["conc"] for r in runs if r["conc"]]
    if concs:
        c = merge_steps(concs)
        lines += [
            "",
            f"Concurrency: {c['calls']} calls at {c['rate']:g}/s, each held {c['hold_ms'] / 1000:g} s, "
            f"so ~{c['calls']} are up at once for ~{c['hold_ms'] / 1000 - c['calls'] / c['rate']:g} s:",
            "",
            *TABLE_HEAD,
            step_row(c),
        ]
    idle = [s["idle_pct"] for r in runs for s in r["steps"][:1] if "idle_pct" in s]
    if idle:
        lines += [
            "",
            "The idle lab (no calls, 3 s before the first step: RM's OPTIONS probes, timers) uses "
            + ", ".join(f"{SHORT[k]} {fmt(med([i[k] for i in idle]), 1)} %" for k in DAEMONS)
            + " of a core; that is included in the per-call CPU above.",
        ]
    if failing:
        labels = [*DAEMONS]
        top = max(labels, key=lambda k: med([s["cpu_pct_mean"][k] for s in failing]) or 0)
        top_mean = med([s["cpu_pct_mean"][top] for s in failing])
        top_peak = med([s["cpu_pct_peak"][top] for s in failing])
        machine_pct = med([s["machine_busy_pct"] for s in failing])
        other = med([s["other_pct"] for s in failing])
        cores = os.cpu_count() or 1
        per_call = med([sum(s["cpu_ms_per_call"][k] for k in DAEMONS) for s in failing])
        biggest = max(DAEMONS, key=lambda k: med([s["cpu_ms_per_call"][k] for s in failing]) or 0)
        saturated = machine_pct > 85 * cores
        lines += [
            "",
            f"**Bottleneck** (medians over the failing steps): the busiest daemon was {SHORT[top]} "
            f"({top}) at {fmt(top_mean)} % of a core on average, {fmt(top_peak)} % in its busiest second"
            + (
                f"; no daemon was near 100 % of a core, but the machine was saturated "
                f"({fmt(machine_pct)} % of {cores * 100} %, of which {fmt(other)} % other people's work). "
                f"The limit on this machine is CPU shared by every daemon ({fmt(per_call, 1)} ms per call "
                f"together), SIPp and the rest; {SHORT[biggest]} ({biggest}) costs the most per call "
                f"({fmt(med([s['cpu_ms_per_call'][biggest] for s in failing]), 1)} ms, MCP1 and MCP2 "
                "split the media and count separately) and its lag is what the failures show."
                if saturated
                else f"; the machine was at {fmt(machine_pct)} % of {cores * 100} %."
            ),
        ]
    lines += [
        "",
        "Per-run highest passing rate: " + ", ".join(f"{r['highest_passing']:g}" for r in runs) + ".",
    ]
    if "stack_cpu_ms_per_call" in heads:
        lines += [
            f"At {fmt(heads['sip_calls_per_second_sustained'])} calls/s the stack's daemons together "
            f"used {heads['stack_cpu_ms_per_call']:g} ms of CPU per call, so with {os.cpu_count()} cores "
            f"to themselves (no SIPp, nobody else) they could not exceed "
            f"~{heads['sip_calls_per_second_cpu_ceiling']} calls/s of {args.hold_ms / 1000:g} s calls; "
            "an estimate, not a measurement (the per-call cost itself grows under contention).",
        ]
    if failing:
        lines += ["", "What failed first (per failing step):"]
        for s in failing:
            what = []
            if s["failed"]:
                what.append(
                    f"{s['failed']} call(s) failed "
                    f"({', '.join(f'{k} {v}' for k, v in s['failures'].items())})"
                )
            if s["indexed"] < s["calls"]:
                what.append(f"{s['calls'] - s['indexed']} recording(s) missing")
            if s["duration_bad"]:
                what.append(f"{s['duration_bad']} duration(s) off by > {args.duration_tolerance:g} s")
            if not s.get("keeps_up", True):
                what.append(f"answered only {fmt(s['answered_per_s'])} calls/s (did not keep up)")
            if s["dead"]:
                what.append(f"daemons died: {', '.join(s['dead'])}")
            if s.get("unfinished"):
                what.append(f"{s['unfinished']} calls still up when SIPp was stopped")
            lines.append(
                f"- {s['rate']:g} calls/s: {'; '.join(what) or 'see the log'}; busiest: {bottleneck(s)}"
            )
            for kind in s["sipp_errors"]:
                lines.append(f"  - SIPp errors.log: {kind}")
            if s["udp_dropped"]:
                lines.append(
                    "  - UDP datagrams dropped by the kernel (receive buffer full): "
                    + ", ".join(f"{k} {v}" for k, v in s["udp_dropped"].items())
                )
            for label, p in s["log_problems"].items():
                lines.append(f"  - {label}: {p['count']} warning/error lines, e.g.:")
                lines += [f"    `{ex[24:][:220]}`" for ex in p["examples"][:3]]
    seen = " ".join(k for s in failing for k in s["sipp_errors"])
    notes = []
    if re.search(r"expecting '1[08]0' \(index \d+\), received 'SIP/2.0 407", seen):
        notes.append(
            "A 407 arriving while SIPp waits for the answer to its authenticated INVITE is a second copy "
            "of the SIP Server's challenge to the first INVITE: the server sends it again when it sees "
            "SIPp's retransmission of that INVITE (sent after 500 ms without a response) or gets no ACK "
            "within 500 ms (RFC 3261 timer G; the ACK may also be among the dropped datagrams). Either "
            "way the signalling path was more than 500 ms behind. SIPp's scenario takes the copy as "
            "unexpected and aborts the call (a phone would ACK it again); the server's 200 for the "
            "aborted call is then never ACKed (`no ACK from A for our 200`)."
        )
    if any(s["udp_dropped"] for s in failing):
        notes.append(
            "*UDP datagrams dropped*: the kernel's per-socket drop counter (`/proc/net/udp`) of the "
            "daemons' SIP sockets over the step; the daemons do not set `SO_RCVBUF`, so a socket gets "
            f"`net.core.rmem_default` ({_sysctl('net/core/rmem_default')} bytes here), and messages "
            "arriving while the event loop lags overflow it (each drop is a retransmission later)."
        )
    if any(s["duration_bad"] for s in failing):
        notes.append(
            "*Durations off*: SIPp plays RTP until the BYE is answered, so a recording ends when the "
            "BYE reaches the MCP; a late BYE (signalling lag) makes it longer than the hold time. "
            "Calls that failed before any RTP was relayed give 0 s recordings."
        )
    if notes:
        lines += ["", "How to read the failures:", *[f"- {n}" for n in notes]]
    lines += ["", "Headline lines (`bench/run_all.py` prints them):", "```"]
    lines += [f"{k}: {v:g}" if isinstance(v, (int, float)) else f"{k}: {v}" for k, v in heads.items()]
    lines += ["```", END]
    return "\n".join(lines) + "\n"


def _sysctl(name: str) -> str:
    try:
        return Path("/proc/sys", name).read_text().strip()
    except OSError:
        return "?"


def write_doc(section: str, path: Path = DOC) -> None:
    """Replace the call_rate section of the file (or append it); leave everything else as it is."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        text = head + section.rstrip("\n") + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rates", default="10,20,30,40,50,60,80,100", help="calls/s, comma-separated, ascending")
    p.add_argument("--calls", type=int, default=0, help="calls per step (default: rate x --seconds)")
    p.add_argument("--seconds", type=float, default=10.0, help="seconds of call placing per step")
    p.add_argument("--hold-ms", type=int, default=3000, help="call duration after the answer")
    p.add_argument("--conc-calls", type=int, default=250, help="calls of the concurrency step")
    p.add_argument("--conc-rate", type=float, default=25.0)
    p.add_argument("--conc-hold-ms", type=int, default=20000)
    p.add_argument("--no-conc", action="store_true", help="skip the concurrency step")
    p.add_argument("--repeat", type=int, default=1, help="sweeps (each in a fresh lab); medians")
    p.add_argument("--index-timeout", type=float, default=30.0, help="s after the last BYE")
    p.add_argument("--duration-tolerance", type=float, default=0.5, help="s, |duration - hold|")
    p.add_argument(
        "--min-answered", type=float, default=0.9, help="a step fails below this x rate answered per second"
    )
    p.add_argument("--settle", type=float, default=2.0, help="s between steps")
    p.add_argument("--no-doc", action="store_true", help="do not write docs/BENCHMARKS.md")
    p.add_argument("--doc", type=Path, default=DOC, help=argparse.SUPPRESS)  # another file, for trying
    p.add_argument("--render", help="no run: write the doc section from a --json file of an earlier run")
    p.add_argument("--json", help="write all results as JSON to this file")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, SIPp files)")
    return p.parse_args(argv)


# options that change where results go, not what is measured
_OUTPUT_OPTIONS = {"--json": 1, "--keep": 0, "--no-doc": 0, "--doc": 1, "--render": 1}


def reproduce_command(argv: list[str]) -> str:
    """The command line that reproduces the figures (output options left out)."""
    kept: list[str] = []
    skip = 0
    for arg in argv:
        if skip:
            skip -= 1
            continue
        name = arg.split("=", 1)[0]
        if name in _OUTPUT_OPTIONS:
            skip = _OUTPUT_OPTIONS[name] if "=" not in arg else 0
            continue
        kept.append(arg)
    return " ".join([".venv/bin/python bench/call_rate.py", *map(shlex.quote, kept)])


def report(args: argparse.Namespace, runs: list[dict[str, Any]], mach: dict[str, str], meta: dict) -> None:
    """Print the summary, write the doc section (unless --no-doc), end with the headline lines."""
    heads = headlines(runs)
    failing = [s for r in runs for s in r["steps"] if not s["passed"]]
    print("", flush=True)
    for r in runs:
        last = r["steps"][-1] if r["steps"] else None
        msg = f"highest passing rate {r['highest_passing']:g} calls/s"
        if last and not last["passed"]:
            msg += f"; failed at {last['rate']:g} calls/s, busiest daemon {bottleneck(last)}"
        elif last:
            msg += f" (every step passed; busiest daemon at the top step: {bottleneck(last)})"
        print(msg, flush=True)
    if not failing:
        print("no step failed: the limit is above the highest rate tested (--rates)", flush=True)
    if not args.no_doc:
        write_doc(render_doc(args, runs, mach, meta), args.doc)
        print(f"wrote the call_rate section of {args.doc}", flush=True)
    for k, v in heads.items():
        print(f"{k}: {v:g}" if isinstance(v, (int, float)) else f"{k}: {v}", flush=True)


async def amain(args: argparse.Namespace) -> int:
    if args.render:  # the doc section again from a saved run, with the options that run had
        saved = json.loads(Path(args.render).read_text())
        meta = saved["meta"]
        run_args = parse_args(shlex.split(meta["command"])[2:])
        run_args.no_doc, run_args.doc = args.no_doc, args.doc
        meta["command"] = reproduce_command(shlex.split(meta["command"])[2:])
        report(run_args, saved["runs"], saved["machine"], meta)
        return 0
    mach = machine()
    load_before = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"machine: {mach['cpu']}, {mach['cores']} CPUs, Linux {mach['kernel']}, Python {mach['python']}, "
        f"SIPp {mach['sipp']}; load average {load_before}",
        flush=True,
    )
    workdir = Path(tempfile.mkdtemp(prefix="callvault-call-rate-"))
    runs = []
    others: list[str] = []
    t0 = time.monotonic()
    try:
        for rep in range(1, args.repeat + 1):
            runs.append(await sweep(args, workdir, rep))
            others += [o for o in other_processes({os.getpid()}) if o not in others]
    finally:
        if args.keep:
            print(f"files kept in {workdir}", flush=True)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    meta = {
        "command": reproduce_command(sys.argv[1:]),
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "load_before": load_before,
        "others": others[:4],
        "minutes": round((time.monotonic() - t0) / 60, 1),
    }
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": mach, "meta": meta, "runs": runs}, indent=1))
    report(args, runs, mach, meta)
    return 0


def main() -> int:
    return asyncio.run(amain(parse_args()))


if __name__ == "__main__":
    sys.exit(main())
