"""Run SIPp (Debian ``sip-tester`` 3.6.1) scenarios from tests, under asyncio.

    result = await run_uac("uac_pcap_auth.xml", "127.0.0.1:5060", workdir=tmp_path / "a",
                           service="1002", user="1001", auth=("1001", "pw"), duration_ms=3000)
    assert result.ok, result.describe()

    uas = await start_uas("uas_echo.xml", workdir=tmp_path / "b", rtp_echo=True)
    ...                     # uas.local_port / uas.media_port are known before it starts
    result = await uas.stop()

Each instance gets its own working directory with ``stat.csv`` (``-trace_stat -stf``, dumped every
second and at exit), ``errors.log`` (``-trace_err``), ``messages.log`` (``-trace_msg``), ``screen.log``
(``-trace_screen``, written at exit) and ``sipp.out`` (stdout/stderr), and its own control port
(``-cp``: two background SIPps on the default 8888 collide) and media port (``-mp``).

Scenarios live in ``deploy/sipp/``; they use the keywords ``[user]`` (our extension), ``[expires]``,
``[password]`` and ``[realm]`` (test-support UAS only), which this module always defines with
``-key`` so that every scenario runs (SIPp refuses a scenario with an undefined keyword).

Traps found on SIPp 3.6.1:
- ``-bg`` forks and the parent exits: keep SIPp in the foreground (``-nostdin``) so the pid is ours.
- SIGUSR1 is a soft exit (like ``q``: stop placing calls, wait for the running ones); ``Q`` sent to
  the control port quits at once; both still write the final statistics. SIGTERM loses them.
- ``[cseq]`` increments on every request except ACK and CANCEL, which makes it right for the ACK and
  CANCEL of a challenged INVITE whatever path the scenario took.
- ``<exec play_pcap_audio=...>`` paths are relative to SIPp's cwd: scenarios use absolute
  ``/usr/share/sip-tester/*.pcap`` paths (``dpkg -L sip-tester | grep pcap``).
- A scenario variable that is assigned but used only once is a fatal error ("Variable $x is
  referenced 1 times"): list such regexp groups in ``<Reference variables="..."/>``.
- Actions have no ``condexec``: conditional assignments need one ``<nop condexec=...>`` each, and
  ``condexec``/``test`` check that a variable is *set* (a bool: true; a regexp: matched non-empty).
- ``verifyauth`` (test-support UAS) reads only ``Authorization``: challenge with 401, not 407.
- An unexpected final response (486 while waiting for 180/200) fails the call; SIPp still ACKs it.
  ``SippResult.received_responses()`` lists the codes for asserts (busy: ``486 in ...``).
- Exit codes: 0 all calls succeeded, 1 some failed, 97 internal command exit, 99 no call processed,
  255 (-1) fatal error (a bad scenario or option: see ``sipp.out``), 254 (-2) cannot bind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "PCAP_DIR",
    "SCENARIO_DIR",
    "Sipp",
    "SippError",
    "SippResult",
    "free_tcp_port",
    "free_udp_port",
    "run_uac",
    "scenario_path",
    "start_registered_uas",
    "start_uas",
]

SCENARIO_DIR = Path(__file__).resolve().parents[2] / "deploy" / "sipp"
PCAP_DIR = Path("/usr/share/sip-tester")
SIPP = "sipp"


class SippError(RuntimeError):
    """SIPp could not be started or did not stop in time."""


def scenario_path(name: str | os.PathLike[str]) -> Path:
    """A scenario by file name (``uas_echo.xml``) from ``deploy/sipp``, or any path that exists."""
    path = Path(name)
    if path.exists():
        return path.resolve()
    candidate = SCENARIO_DIR / path
    if not candidate.exists():
        raise FileNotFoundError(f"SIPp scenario {name} not found in {SCENARIO_DIR}")
    return candidate


def _fixed_port_range() -> tuple[int, int]:
    """Ports for peers, below the kernel's ephemeral range (which port-0 binds and outgoing TCP use)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    if low < 12000:
        return 10000, 60000
    return max(10000, low - 12000), low - 64


def free_udp_port(host: str = "127.0.0.1", *, span: int = 1, tcp: bool = False) -> int:
    """A port such that ``port .. port+span-1`` are free for UDP (and TCP with ``tcp``) right now.

    Chosen at random below the ephemeral port range, so that neither a port-0 bind elsewhere nor
    the local end of an outgoing TCP connection can take it between now and the peer's bind (the
    remaining race is with other callers of this function). ``span`` > 1 gives an even port (RTP).
    """
    low, high = _fixed_port_range()
    for _ in range(500):
        port = random.randrange(low, high - span)
        if span > 1:
            port -= port % 2
        kinds = [socket.SOCK_DGRAM, socket.SOCK_STREAM] if tcp else [socket.SOCK_DGRAM]
        sockets: list[socket.socket] = []
        try:
            for p in range(port, port + span):
                for kind in kinds:
                    sock = socket.socket(socket.AF_INET, kind)
                    sockets.append(sock)
                    sock.bind((host, p))
            return port
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise SippError("no free port found")


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A free TCP (and UDP) port below the ephemeral range."""
    return free_udp_port(host, tcp=True)


@dataclass
class SippResult:
    """What a finished SIPp run reported."""

    returncode: int | None
    successful: int
    failed: int
    stats: dict[str, str] = field(default_factory=dict)  # the last row of the stat CSV
    screen: str = ""
    errors: str = ""
    output: str = ""
    workdir: Path | None = None

    @property
    def ok(self) -> bool:
        """At least one call, none failed, SIPp exited 0."""
        return self.returncode == 0 and self.failed == 0 and self.successful > 0

    def stat(self, name: str) -> int:
        """A cumulative counter from the stat CSV, e.g. ``stat("FailedCallRejected")``."""
        value = self.stats.get(f"{name}(C)", self.stats.get(name, "0"))
        try:
            return int(float(value))
        except ValueError:
            return 0

    def received_responses(self) -> list[int]:
        """Status codes of the responses SIPp received, in order (from ``messages.log``)."""
        if self.workdir is None:
            return []
        codes = []
        received = False
        for line in _read(self.workdir / "messages.log").splitlines():
            if line.startswith("Unexpected"):
                received = False  # SIPp logs an unexpected message a second time
            elif "message received" in line:
                received = True
            elif "message sent" in line:
                received = False
            elif received and line.startswith("SIP/2.0 ") and line[8:11].isdigit():
                codes.append(int(line[8:11]))
                received = False
        return codes

    def describe(self) -> str:
        """A failure message for asserts: counters, the error log and the end of the screen."""
        return (
            f"sipp rc={self.returncode} successful={self.successful} failed={self.failed} "
            f"workdir={self.workdir}\n--- errors ---\n{self.errors[-3000:]}\n--- screen ---\n"
            f"{self.screen[-3000:]}\n--- output ---\n{self.output[-1500:]}"
        )


def parse_stat_csv(text: str) -> dict[str, str]:
    """The last data row of a ``-trace_stat`` CSV (``;``-separated, header first) as a dict."""
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) < 2:
        return {}
    header = lines[0].split(";")
    return dict(zip(header, lines[-1].split(";"), strict=False))


class Sipp:
    """One SIPp process with its own working directory, control port and media port."""

    def __init__(
        self,
        scenario: str | os.PathLike[str],
        *,
        workdir: str | os.PathLike[str],
        remote: str | None = None,
        local_ip: str = "127.0.0.1",
        local_port: int | None = None,
        media_port: int | None = None,
        control_port: int | None = None,
        service: str | None = None,
        user: str = "sipp",
        auth: tuple[str, str] | None = None,
        keys: Mapping[str, str] | None = None,
        rate: float | None = None,
        rate_period_ms: int | None = None,
        max_calls: int | None = None,
        limit: int | None = None,
        duration_ms: int | None = None,
        rtp_echo: bool = False,
        timeout_s: float | None = None,
        recv_timeout_ms: int | None = None,
        transport: str = "u1",
        trace_messages: bool = True,
        extra_args: Iterable[str] = (),
    ) -> None:
        self.scenario = scenario_path(scenario)
        self.workdir = Path(workdir)
        self.remote = remote
        self.local_ip = local_ip
        self.local_port = local_port or free_udp_port(local_ip)
        self.media_port = media_port or free_udp_port(local_ip, span=4)
        self.control_port = control_port or free_udp_port(local_ip)
        self.service = service
        self.user = user
        self.auth = auth
        self.keys = {"user": user, "expires": "3600", "password": "password", "realm": "callvault"}
        if auth is not None:
            self.keys["password"] = auth[1]
        self.keys.update(keys or {})
        self.rate = rate
        self.rate_period_ms = rate_period_ms
        self.max_calls = max_calls
        self.limit = limit
        self.duration_ms = duration_ms
        self.rtp_echo = rtp_echo
        self.timeout_s = timeout_s
        self.recv_timeout_ms = recv_timeout_ms
        self.transport = transport
        self.trace_messages = trace_messages
        self.extra_args = list(extra_args)
        self.process: asyncio.subprocess.Process | None = None
        self._result: SippResult | None = None

    # -- files ----------------------------------------------------------------------------------
    @property
    def stat_file(self) -> Path:
        return self.workdir / "stat.csv"

    @property
    def error_file(self) -> Path:
        return self.workdir / "errors.log"

    @property
    def message_file(self) -> Path:
        return self.workdir / "messages.log"

    @property
    def screen_file(self) -> Path:
        return self.workdir / "screen.log"

    @property
    def output_file(self) -> Path:
        return self.workdir / "sipp.out"

    def argv(self) -> list[str]:
        """The SIPp command line."""
        args = [SIPP]
        if self.remote:
            args.append(self.remote)
        args += ["-sf", str(self.scenario), "-i", self.local_ip, "-p", str(self.local_port)]
        args += ["-mi", self.local_ip, "-mp", str(self.media_port), "-cp", str(self.control_port)]
        args += ["-t", self.transport, "-nostdin"]
        if self.service is not None:
            args += ["-s", self.service]
        if self.auth is not None:
            args += ["-au", self.auth[0], "-ap", self.auth[1]]
        for name, value in self.keys.items():
            args += ["-key", name, value]
        if self.rate is not None:
            args += ["-r", f"{self.rate:g}"]
        if self.rate_period_ms is not None:
            args += ["-rp", f"{self.rate_period_ms}ms"]
        if self.max_calls is not None:
            args += ["-m", str(self.max_calls)]
        if self.limit is not None:
            args += ["-l", str(self.limit)]
        if self.duration_ms is not None:
            args += ["-d", str(self.duration_ms)]
        if self.rtp_echo:
            args.append("-rtp_echo")
        if self.timeout_s is not None:
            args += ["-timeout", f"{self.timeout_s:g}s", "-timeout_error"]
        if self.recv_timeout_ms is not None:
            args += ["-recv_timeout", f"{self.recv_timeout_ms}ms"]
        args += ["-trace_stat", "-stf", str(self.stat_file), "-fd", "1"]
        args += ["-trace_err", "-error_file", str(self.error_file)]
        args += ["-trace_screen", "-screen_file", str(self.screen_file)]
        if self.trace_messages:
            args += ["-trace_msg", "-message_file", str(self.message_file)]
        return args + self.extra_args

    # -- lifecycle ------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def start(self) -> None:
        """Start SIPp; returns once it is bound (a UAS is ready for calls)."""
        if self.process is not None:
            raise SippError("this SIPp instance was already started")
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.output_file, "wb") as out:
            self.process = await asyncio.create_subprocess_exec(
                *self.argv(),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,
            )
        await self._wait_bound()

    async def _wait_bound(self, timeout: float = 5.0) -> None:
        # SIPp binds its SIP port early; probing that it is taken avoids sleeping a fixed time.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            assert self.process is not None
            if self.process.returncode is not None:
                if self.process.returncode in (0, 1, 97, 99):
                    return  # a very short run that finished already: wait() reports it
                result = self._collect()
                raise SippError(f"SIPp failed to start\n{result.describe()}")
            probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                probe.bind((self.local_ip, self.local_port))
            except OSError:
                return
            finally:
                probe.close()
            await asyncio.sleep(0.02)
        raise SippError(f"SIPp did not bind {self.local_ip}:{self.local_port} within {timeout} s")

    async def wait(self, timeout: float | None = None) -> SippResult:
        """Wait for SIPp to exit by itself (``-m`` reached); on timeout stop it and raise."""
        if self.process is None:
            raise SippError("SIPp was not started")
        try:
            await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            result = await self.stop()
            raise SippError(f"SIPp did not finish within {timeout} s\n{result.describe()}") from None
        return self._collect()

    async def stop(self, timeout: float = 5.0) -> SippResult:
        """Soft exit (SIGUSR1: finish running calls), then ``Q`` on the control port, then SIGKILL."""
        if self.process is None:
            raise SippError("SIPp was not started")
        if self.process.returncode is None:
            steps = [self._soft_exit, self._hard_exit, self._kill]
            for step in steps:
                step()
                try:
                    await asyncio.wait_for(self.process.wait(), timeout / len(steps))
                    break
                except TimeoutError:
                    continue
            else:
                await self.process.wait()
        return self._collect()

    def _soft_exit(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            assert self.process is not None
            self.process.send_signal(signal.SIGUSR1)

    def _hard_exit(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as control:
            control.sendto(b"Q", (self.local_ip, self.control_port))

    def _kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            assert self.process is not None
            self.process.kill()

    def _collect(self) -> SippResult:
        assert self.process is not None
        stats = parse_stat_csv(_read(self.stat_file))
        self._result = SippResult(
            returncode=self.process.returncode,
            successful=_int(stats.get("SuccessfulCall(C)")),
            failed=_int(stats.get("FailedCall(C)")),
            stats=stats,
            screen=_read(self.screen_file),
            errors=_read(self.error_file),
            output=_read(self.output_file)[-20000:],
            workdir=self.workdir,
        )
        return self._result

    @property
    def result(self) -> SippResult | None:
        return self._result

    async def __aenter__(self) -> Sipp:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.running:
            await self.stop()


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _int(value: str | None) -> int:
    try:
        return int(float(value)) if value else 0
    except ValueError:
        return 0


async def run_uac(
    scenario: str | os.PathLike[str],
    remote: str,
    *,
    workdir: str | os.PathLike[str],
    max_calls: int = 1,
    timeout: float = 30.0,
    **kwargs: object,
) -> SippResult:
    """Run a UAC scenario against ``remote`` (``host:port``) until ``max_calls`` calls are done."""
    sipp = Sipp(scenario, workdir=workdir, remote=remote, max_calls=max_calls, **kwargs)  # type: ignore[arg-type]
    await sipp.start()
    return await sipp.wait(timeout)


async def start_uas(
    scenario: str | os.PathLike[str], *, workdir: str | os.PathLike[str], **kwargs: object
) -> Sipp:
    """Start a UAS scenario in the background; ``await uas.stop()`` returns its result."""
    sipp = Sipp(scenario, workdir=workdir, **kwargs)  # type: ignore[arg-type]
    await sipp.start()
    return sipp


async def start_registered_uas(
    scenario: str | os.PathLike[str],
    registrar: str,
    user: str,
    password: str,
    *,
    workdir: str | os.PathLike[str],
    expires: int = 3600,
    timeout: float = 10.0,
    **kwargs: object,
) -> Sipp:
    """Register ``user`` at ``registrar`` (``uac_register_auth.xml``) from a port, then start the UAS
    ``scenario`` on that same port, so that calls to ``user`` reach it.

    SIPp cannot register from inside a UAS scenario, so this runs two SIPps one after the other; the
    Contact (``sip:user@127.0.0.1:PORT``) stays valid for ``expires`` seconds.
    """
    workdir = Path(workdir)
    local_port = kwargs.pop("local_port", None) or free_udp_port()
    registration = await run_uac(
        "uac_register_auth.xml",
        registrar,
        workdir=workdir / "register",
        user=user,
        auth=(user, password),
        keys={"expires": str(expires)},
        local_port=local_port,
        timeout=timeout,
    )
    if not registration.ok:
        raise SippError(f"registering {user} at {registrar} failed\n{registration.describe()}")
    return await start_uas(scenario, workdir=workdir / "uas", local_port=local_port, **kwargs)
