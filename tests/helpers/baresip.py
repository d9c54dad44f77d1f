"""A headless baresip (Debian ``baresip-core`` 1.0.0) phone for tests, driven under asyncio.

    phone = BaresipPhone(tmp_path / "a", "1001", "pw", "127.0.0.1:5060", audio_file=wav)
    await phone.start()                 # writes config + accounts, starts baresip, connects ctrl_tcp
    await phone.wait_registered()
    await phone.dial("sip:1002@127.0.0.1")
    await phone.wait_established()
    await phone.wait_closed(timeout=15) # aufile hangs up at the end of audio_file
    rate, audio = read_wav(phone.received_wav())
    await phone.stop()

How it is controlled (what works with 1.0.0):
- Commands go over the ``ctrl_tcp`` module (``ctrl_tcp_listen 127.0.0.1:PORT``): netstrings of JSON
  ``{"command": "dial", "params": "sip:...", "token": "7"}`` answered by
  ``{"response": true, "ok": true, "data": "...", "token": "7"}``. Command names are the menu's
  long names without the slash: ``dial``, ``hangup``, ``accept``, ``reginfo``, ``listcalls``,
  ``ausrc``, ``quit`` (``help`` lists them). ``-e "/dial ..."`` also works but only at start-up, and
  the ``stdio`` module needs a terminal, so stdin is not used.
- States come as ctrl_tcp events on the same connection: ``{"event": true, "type": "CALL_ESTABLISHED",
  "id": ..., "peeruri": ..., "param": ...}`` (CALL_INCOMING, CALL_RINGING, CALL_PROGRESS,
  CALL_ESTABLISHED, CALL_RTPESTAB, CALL_CLOSED, REGISTER_OK, REGISTER_FAIL, ...). Registration
  often completes before the ctrl connection is up, so ``wait_registered`` also watches stdout
  (``1001@127.0.0.1: {0/UDP/v4} 200 OK () [1 binding]``) and polls ``reginfo``.
- stdout is kept in ``baresip.log`` (the menu's call-status line is ``\\r``-terminated).

Traps found:
- ``sip_listen 127.0.0.1:P`` binds UDP and TCP on P and SIP/TLS on P + 1 (no way to turn TLS off in
  1.0.0); if any of them is taken baresip exits with "init failed (Address already in use)". Ports
  are therefore picked below the ephemeral range, where outgoing TCP connections cannot take them.
- ``net_interface 127.0.0.1`` is needed or the SDP carries the external address.
- aufile ends the call when its file ends (menu: "audio error ... end of file"): pad the WAV with
  as much silence as the call should last (``audio.speech_wav(pad_s=...)``). A phone without an
  ``audio_file`` plays a long silence file instead.
- The ``sndfile`` module writes ``dump-<YYYY-MM-DD-hh-mm-ss>-enc.wav`` (what we sent) and ``-dec.wav``
  (what we received and decoded) into ``snd_path``, named by the second the call's audio started:
  two calls of one phone within the same second overwrite each other. The WAV header is
  finalised when the call's audio stops (after CALL_CLOSED).
- The received WAV holds decoded frames only (no silence for time without packets).
- baresip registers a Contact with a suffixed user part (``sip:1001-0x55d1...@127.0.0.1:PORT``): a
  registrar must route to the Contact URI as registered. It accepts INVITEs to the plain AOR too.
- ``quit`` sends an un-REGISTER first; if the registrar does not answer it, baresip lingers, so
  ``stop()`` escalates to SIGTERM, then SIGKILL.
- Without a sound card, ``audio_player`` and ``audio_alert`` point at ``aubridge`` devices (they
  need distinct names per phone: aubridge devices are process-local, so only within one process).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .audio import silence_wav
from .sipp import free_tcp_port, free_udp_port

__all__ = ["BaresipError", "BaresipEvent", "BaresipPhone"]

BARESIP = "baresip"
MODULE_PATH = "/usr/lib/baresip/modules"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_STATUS = re.compile(r"\s*\[\d+:\d\d:\d\d\] audio=")


class BaresipError(RuntimeError):
    """baresip failed to start, refused a command, or a state was not reached in time."""


@dataclass
class BaresipEvent:
    """One ctrl_tcp event (``type`` e.g. ``CALL_ESTABLISHED``) or a state seen on stdout."""

    type: str
    data: dict[str, object] = field(default_factory=dict)

    @property
    def call_id(self) -> str | None:
        value = self.data.get("id")
        return str(value) if value is not None else None

    @property
    def param(self) -> str:
        return str(self.data.get("param", ""))


class BaresipPhone:
    """One baresip process with its own config directory, SIP port, RTP range and ctrl_tcp port."""

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        user: str,
        password: str | None = None,
        server: str | None = None,
        *,
        sip_port: int | None = None,
        rtp_ports: tuple[int, int] | None = None,
        audio_file: str | os.PathLike[str] | None = None,
        record_dir: str | os.PathLike[str] | None = None,
        ctrl_port: int | None = None,
        answer_mode: str = "auto",
        codecs: Iterable[str] = ("PCMU",),
        regint: int = 300,
        display_name: str | None = None,
        extra_config: Iterable[str] = (),
        account_params: str = "",
    ) -> None:
        self.workdir = Path(workdir)
        self.user = user
        self.password = password
        self.server = server
        # sip_listen binds UDP and TCP on the port and TLS (TCP) on port + 1.
        self.sip_port = sip_port or free_udp_port(span=2, tcp=True)
        if rtp_ports is None:
            low = free_udp_port(span=20)
            rtp_ports = (low, low + 19)
        self.rtp_ports = rtp_ports
        self.audio_file = Path(audio_file) if audio_file is not None else None
        self.record_dir = Path(record_dir) if record_dir is not None else self.workdir / "rec"
        self.ctrl_port = ctrl_port or free_tcp_port()
        self.answer_mode = answer_mode
        self.codecs = list(codecs)
        self.regint = regint if server else 0
        self.display_name = display_name
        self.extra_config = list(extra_config)
        self.account_params = account_params
        self.events: list[BaresipEvent] = []
        self.output: list[str] = []
        self.process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._changed = asyncio.Condition()
        self._responses: dict[str, asyncio.Future[dict[str, object]]] = {}
        self._token = 0
        self._cursors: dict[str, int] = {}

    # -- addresses ------------------------------------------------------------------------------
    @property
    def uri(self) -> str:
        """Where to reach this phone directly (no registrar): ``sip:user@127.0.0.1:PORT``."""
        return f"sip:{self.user}@127.0.0.1:{self.sip_port}"

    @property
    def aor(self) -> str:
        """The account's address of record (at the registrar if there is one)."""
        return f"sip:{self.user}@{self.server}" if self.server else self.uri

    @property
    def log_path(self) -> Path:
        return self.workdir / "baresip.log"

    # -- configuration --------------------------------------------------------------------------
    def _write_config(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.record_dir.mkdir(parents=True, exist_ok=True)
        source = self.audio_file
        if source is None:
            source = silence_wav(self.workdir / "silence.wav", 120)
        tag = f"{self.user}-{self.sip_port}"
        lines = [
            "poll_method epoll",
            f"sip_listen 127.0.0.1:{self.sip_port}",
            "net_interface 127.0.0.1",
            f"audio_source aufile,{Path(source).resolve()}",
            f"audio_player aubridge,play-{tag}",
            f"audio_alert aubridge,alert-{tag}",
            f"rtp_ports {self.rtp_ports[0]}-{self.rtp_ports[1]}",
            f"module_path {MODULE_PATH}",
            "module g711.so",
            "module aufile.so",
            "module aubridge.so",
            "module sndfile.so",
            "module_app account.so",
            "module_app menu.so",
            "module_app ctrl_tcp.so",
            f"ctrl_tcp_listen 127.0.0.1:{self.ctrl_port}",
            f"snd_path {self.record_dir.resolve()}",
            *self.extra_config,
        ]
        (self.workdir / "config").write_text("\n".join(lines) + "\n")
        name = f'"{self.display_name}" ' if self.display_name else ""
        host = self.server or f"127.0.0.1:{self.sip_port}"
        params = [f"regint={self.regint}", f"answermode={self.answer_mode}"]
        if self.codecs:
            params.append("audio_codecs=" + ",".join(self.codecs))
        if self.password is not None:
            params.insert(0, f"auth_pass={self.password}")
        if self.account_params:
            params.append(self.account_params.lstrip(";"))
        account = f"{name}<sip:{self.user}@{host};transport=udp>;" + ";".join(params)
        (self.workdir / "accounts").write_text(account + "\n")
        # baresip creates these on first run when missing; an empty contacts file keeps it quiet.
        (self.workdir / "contacts").write_text("")

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self, timeout: float = 5.0) -> None:
        """Write the config, start baresip and connect to its ctrl_tcp port."""
        if shutil.which(BARESIP) is None:
            raise BaresipError("baresip is not installed (Debian package baresip-core)")
        if self.process is not None:
            raise BaresipError("this phone was already started")
        self._write_config()
        self.process = await asyncio.create_subprocess_exec(
            BARESIP,
            "-f",
            str(self.workdir.resolve()),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            cwd=self.workdir,
            start_new_session=True,
        )
        self._tasks.append(asyncio.create_task(self._read_stdout()))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if self.process.returncode is not None:
                raise BaresipError(f"baresip exited with {self.process.returncode}:\n{self.tail()}")
            try:
                self._reader, self._writer = await asyncio.open_connection("127.0.0.1", self.ctrl_port)
                break
            except OSError:
                if loop.time() > deadline:
                    await self.stop()
                    raise BaresipError(
                        f"baresip ctrl_tcp port {self.ctrl_port} did not open:\n{self.tail()}"
                    ) from None
                await asyncio.sleep(0.05)
        self._tasks.append(asyncio.create_task(self._read_ctrl()))

    async def stop(self, timeout: float = 4.0) -> None:
        """``quit`` (un-REGISTER, hang up), then SIGTERM twice, then SIGKILL; always reaps baresip."""
        process = self.process
        if process is None:
            return
        if process.returncode is None and self._writer is not None:
            with contextlib.suppress(Exception):
                self._send({"command": "quit", "params": "", "token": "quit"})
        steps: list[Callable[[], None]] = [
            lambda: None,
            lambda: self._signal(signal.SIGTERM),
            lambda: self._signal(signal.SIGTERM),
            lambda: self._signal(signal.SIGKILL),
        ]
        for step in steps:
            if process.returncode is not None:
                break
            step()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), timeout / len(steps))
        await process.wait()
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()
        for task in self._tasks:
            if not task.done():
                task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        for future in self._responses.values():
            if not future.done():
                future.set_exception(BaresipError("baresip stopped"))
        self._responses.clear()

    def _signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            assert self.process is not None
            self.process.send_signal(sig)

    async def __aenter__(self) -> BaresipPhone:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    # -- readers --------------------------------------------------------------------------------
    async def _read_stdout(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        pending = ""
        with open(self.log_path, "w", encoding="utf-8", errors="replace") as log:
            while True:
                chunk = await self.process.stdout.read(4096)
                if not chunk:
                    break
                text = chunk.decode("utf-8", errors="replace")
                log.write(text)
                log.flush()
                pending += text
                *lines, pending = re.split(r"[\r\n]", pending)
                for line in lines:
                    if line.strip():
                        await self._on_line(_ANSI.sub("", line))
        if pending.strip():
            await self._on_line(_ANSI.sub("", pending))
        async with self._changed:
            self._changed.notify_all()

    async def _on_line(self, line: str) -> None:
        if _STATUS.match(line):
            return  # the menu's once-a-tick call status line
        self.output.append(line)
        if len(self.output) > 5000:
            del self.output[:1000]
        event = None
        # "1001@127.0.0.1: {0/UDP/v4} 200 OK () [1 binding]" is baresip 1.0's registration line.
        if re.search(r"\{\d+/\w+/v[46]\} 2\d\d ", line):
            event = BaresipEvent("STDOUT_REGISTER_OK", {"line": line})
        elif re.search(r"\{\d+/\w+/v[46]\} [3-6]\d\d ", line) or ("reg: " in line and "fail" in line.lower()):
            event = BaresipEvent("STDOUT_REGISTER_FAIL", {"line": line})
        async with self._changed:
            if event is not None:
                self.events.append(event)
            self._changed.notify_all()

    async def _read_ctrl(self) -> None:
        assert self._reader is not None
        buffer = b""
        while True:
            chunk = await self._reader.read(65536)
            if not chunk:
                break
            buffer += chunk
            # netstrings: <length>:<payload>,
            while True:
                colon = buffer.find(b":")
                if colon < 0 or not buffer[:colon].isdigit():
                    break
                length = int(buffer[:colon])
                end = colon + 1 + length
                if len(buffer) < end + 1:
                    break
                payload = buffer[colon + 1 : end]
                buffer = buffer[end + 1 :]
                try:
                    message = json.loads(payload)
                except ValueError:
                    continue
                await self._on_message(message)
        async with self._changed:
            self._changed.notify_all()

    async def _on_message(self, message: dict[str, object]) -> None:
        if message.get("response"):
            future = self._responses.pop(str(message.get("token")), None)
            if future is not None and not future.done():
                future.set_result(message)
            return
        if message.get("event"):
            async with self._changed:
                self.events.append(BaresipEvent(str(message.get("type", "")), message))
                self._changed.notify_all()

    # -- commands -------------------------------------------------------------------------------
    def _send(self, message: dict[str, object]) -> None:
        assert self._writer is not None
        payload = json.dumps(message).encode()
        self._writer.write(str(len(payload)).encode() + b":" + payload + b",")

    async def command(self, command: str, params: str = "", *, timeout: float = 5.0) -> str:
        """Run a menu command over ctrl_tcp; returns its text (ANSI colours removed)."""
        if not self.running or self._writer is None:
            raise BaresipError(f"baresip is not running (command {command!r})")
        self._token += 1
        token = str(self._token)
        future: asyncio.Future[dict[str, object]] = asyncio.get_running_loop().create_future()
        self._responses[token] = future
        self._send({"command": command, "params": params, "token": token})
        await self._writer.drain()
        try:
            response = await asyncio.wait_for(future, timeout)
        except TimeoutError:
            self._responses.pop(token, None)
            raise BaresipError(f"baresip did not answer {command!r} within {timeout} s") from None
        data = _ANSI.sub("", str(response.get("data", "")))
        if not response.get("ok"):
            raise BaresipError(f"baresip refused {command} {params}: {data.strip()}")
        return data

    async def dial(self, uri: str) -> None:
        """Place a call (``dial``); wait for it with :meth:`wait_established`."""
        await self.command("dial", uri)

    async def hangup(self) -> None:
        """Hang up the current call (``hangup``)."""
        await self.command("hangup")

    async def answer(self) -> None:
        """Accept the ringing incoming call (``accept``; for ``answer_mode="manual"``)."""
        await self.command("accept")

    async def play(self, wav: str | os.PathLike[str]) -> None:
        """Switch the audio source of the running call to another WAV (``ausrc aufile,PATH``)."""
        await self.command("ausrc", f"aufile,{Path(wav).resolve()}")

    # -- waiting for states ---------------------------------------------------------------------
    async def wait_event(
        self,
        types: str | Iterable[str],
        timeout: float = 10.0,
        *,
        predicate: Callable[[BaresipEvent], bool] | None = None,
        fail_on: Iterable[str] = (),
    ) -> BaresipEvent:
        """The next not yet consumed event of one of ``types`` (each type keeps its own cursor).

        ``fail_on``: event types that mean the awaited state will not come (e.g. CALL_CLOSED while
        waiting for CALL_ESTABLISHED): BaresipError at once. Also raises if baresip exits or on timeout.
        """
        wanted = {types} if isinstance(types, str) else set(types)
        failing = set(fail_on)
        key = ",".join(sorted(wanted))
        cursor = self._cursors.get(key, 0)

        def scan() -> BaresipEvent | None:
            nonlocal cursor
            while cursor < len(self.events):
                event = self.events[cursor]
                cursor += 1
                if event.type in wanted and (predicate is None or predicate(event)):
                    self._cursors[key] = cursor
                    return event
                if event.type in failing:
                    self._cursors[key] = cursor
                    raise BaresipError(f"{event.type} ({event.param}) while waiting for {key}\n{self.tail()}")
            return None

        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with self._changed:
            while True:
                found = scan()
                if found is not None:
                    return found
                if not self.running:
                    raise BaresipError(f"baresip exited while waiting for {key}\n{self.tail()}")
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise BaresipError(f"no {key} within {timeout} s\n{self.tail()}")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), remaining)

    async def wait_registered(self, timeout: float = 10.0) -> None:
        """Registered at the server: REGISTER_OK, the stdout 2xx line, or ``reginfo`` showing OK."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for event in self.events:
                if event.type in ("REGISTER_OK", "STDOUT_REGISTER_OK"):
                    return
                if event.type in ("REGISTER_FAIL", "STDOUT_REGISTER_FAIL"):
                    raise BaresipError(f"registration failed: {event.data}\n{self.tail()}")
            info = await self.command("reginfo")
            if re.search(r"\bOK\b", info):
                return
            if loop.time() > deadline:
                raise BaresipError(f"not registered within {timeout} s: {info.strip()}\n{self.tail()}")
            with contextlib.suppress(BaresipError):
                await self.wait_event(
                    ("REGISTER_OK", "REGISTER_FAIL", "STDOUT_REGISTER_OK", "STDOUT_REGISTER_FAIL"),
                    min(0.2, max(deadline - loop.time(), 0.01)),
                )

    async def wait_incoming(self, timeout: float = 10.0) -> BaresipEvent:
        return await self.wait_event("CALL_INCOMING", timeout)

    async def wait_ringing(self, timeout: float = 10.0) -> BaresipEvent:
        """The remote side rings (180, or 183 progress)."""
        return await self.wait_event(("CALL_RINGING", "CALL_PROGRESS"), timeout, fail_on=("CALL_CLOSED",))

    async def wait_established(self, timeout: float = 10.0) -> BaresipEvent:
        """The call is answered (200/ACK); BaresipError at once if it closes first (busy, 404...)."""
        return await self.wait_event("CALL_ESTABLISHED", timeout, fail_on=("CALL_CLOSED",))

    async def wait_closed(self, timeout: float = 10.0) -> BaresipEvent:
        """The call ended (BYE either way, CANCEL, rejection); ``event.param`` holds the reason."""
        return await self.wait_event("CALL_CLOSED", timeout)

    # -- recordings -----------------------------------------------------------------------------
    def recordings(self, kind: str = "dec") -> list[Path]:
        """sndfile's WAVs of ``kind`` ``dec`` (received) or ``enc`` (sent), oldest first."""
        return sorted(self.record_dir.glob(f"*-{kind}.wav"), key=lambda p: (p.stat().st_mtime, p.name))

    def received_wav(self) -> Path | None:
        """What this phone received in its latest call (decoded), None before any call."""
        files = self.recordings("dec")
        return files[-1] if files else None

    def sent_wav(self) -> Path | None:
        """What this phone sent in its latest call, as encoded."""
        files = self.recordings("enc")
        return files[-1] if files else None

    def tail(self, lines: int = 25) -> str:
        """The end of baresip's output, for error messages."""
        return "\n".join(self.output[-lines:])
