"""The RM pair's authenticated affinity replication, with two real RM processes on 127.0.0.1.

``callvault resource-manager --name rm1`` and ``--name rm2`` run from one configuration whose
``[[resource_manager.instances]]`` also lists ``rm3``: that one is this test, holding the pair's
secret and speaking the link by hand (services/ha_auth.py), so that it can put a session into rm1
and read the affinity rm1 and rm2 hold (each RM sends its whole state as a snapshot whenever its
link to rm3 is re-established). It shows:

* a session rm1 holds reaches rm2 over their authenticated link (rm2's start-up snapshot merge);
* strangers without the secret, on either RM's replication port (the old unauthenticated protocol,
  a hello without a nonce, a wrong MAC, a sealed line under the wrong key), change no affinity, are
  logged at WARNING with their address, and do not disturb the rm1 <-> rm2 link;
* an RM pair configured without a secret refuses to start, naming the setting.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services import ha_auth
from services.cli import READY_MARK
from services.lab import free_port
from services.resource_manager.affinity import AffinityEntry
from services.resource_manager.replication import LinkCodec

SECRET = "integration-rm-pair-secret"
ROOT = Path(__file__).resolve().parents[2]


def config_text(ports: dict[str, tuple[int, int]], secret: str | None) -> str:
    text = "[resource_manager]\noptions_interval = 0.5\nsync_timeout = 3.0\n"
    if secret is not None:
        text += f'replication_secret = "{secret}"\n'
    for name, (sip, repl) in ports.items():
        text += (
            f'\n[[resource_manager.instances]]\nname = "{name}"\nhost = "127.0.0.1"\n'
            f"port = {sip}\nreplication_port = {repl}\n"
        )
    return text + '\n[[tenants]]\nid = "acme"\napi_key = "acme-key-0123456789"\ndomains = ["acme.test"]\n'


class Rm3:
    """The test as the third RM: accepts rm1's and rm2's links (both names sort before rm3)."""

    def __init__(self) -> None:
        self.links: dict[str, tuple[asyncio.StreamWriter, ha_auth.Sealer]] = {}
        self.snapshots: dict[str, list[set[str]]] = {"rm1": [], "rm2": []}
        self.server: asyncio.Server | None = None

    async def start(self, port: int) -> None:
        self.server = await asyncio.start_server(self._accepted, "127.0.0.1", port)

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonce = ha_auth.new_nonce()
        writer.write(LinkCodec.hello("rm3", nonce))
        try:
            hello = LinkCodec.decode(await reader.readline())
            peer = hello["name"]
            writer.write(LinkCodec.auth(SECRET.encode(), hello["nonce"], "rm3", "accept"))
            LinkCodec.verify_auth(
                SECRET.encode(), nonce, peer, "dial", LinkCodec.decode(await reader.readline())
            )
            sealer, opener = LinkCodec.session(
                SECRET.encode(), "rm3", peer, dialled=False, my_nonce=nonce, peer_nonce=hello["nonce"]
            )
            writer.write(sealer.seal(b'{"t":"snapshot","entries":[]}'))  # rm3 holds nothing
            self.links[peer] = (writer, sealer)
            while line := await reader.readline():
                msg = LinkCodec.decode(opener.open(line))
                if msg["t"] == "snapshot":
                    self.snapshots[peer].append({e["session_id"] for e in msg["entries"]})
        except (ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    def put(self, peer: str, entry: AffinityEntry) -> None:
        writer, sealer = self.links[peer]
        writer.write(sealer.seal(LinkCodec.change(("put", entry.to_dict()))))

    async def fresh_snapshot(self, peer: str, timeout: float = 10.0) -> set[str]:
        """Drop the link with ``peer``; it dials again and sends its whole affinity."""
        seen = len(self.snapshots[peer])
        writer, _ = self.links.pop(peer)
        writer.close()
        await until(lambda: len(self.snapshots[peer]) > seen and peer in self.links, timeout)
        return self.snapshots[peer][-1]

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for writer, _ in self.links.values():
            writer.close()


async def until(cond, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition never met"
        await asyncio.sleep(0.02)


class RmProcess:
    """``callvault resource-manager --name NAME`` as a child process, its log in a file."""

    def __init__(self, name: str, config: Path, log: Path) -> None:
        self.name, self.config, self.log = name, config, log
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, timeout: float = 20.0) -> None:
        with open(self.log, "ab") as logfile:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "services.cli", "resource-manager",
                "--config", str(self.config), "--name", self.name,
                cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=logfile,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )  # fmt: skip
        assert self.proc.stdout is not None
        try:
            async with asyncio.timeout(timeout):
                while READY_MARK.encode() not in await self.proc.stdout.readline():
                    assert self.proc.returncode is None, self.text()
        except TimeoutError:
            raise AssertionError(f"{self.name} not ready within {timeout} s:\n{self.text()}") from None

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 10.0)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


@pytest.fixture
async def rm_ports() -> AsyncIterator[dict[str, tuple[int, int]]]:
    yield {name: (free_port(), free_port()) for name in ("rm1", "rm2", "rm3")}


async def _stranger(port: int, lines: list[bytes]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await asyncio.wait_for(reader.readline(), 5.0)  # the RM's hello
    writer.write(b"".join(lines))
    with contextlib.suppress(ConnectionError):
        await writer.drain()
        while await asyncio.wait_for(reader.readline(), 5.0):  # until the RM closes it
            pass
    writer.close()


async def test_replication_between_real_rms_and_strangers_change_nothing(
    tmp_path: Path, rm_ports: dict[str, tuple[int, int]]
) -> None:
    config = tmp_path / "callvault.toml"
    config.write_text(config_text(rm_ports, SECRET))
    rm3 = Rm3()
    await rm3.start(rm_ports["rm3"][1])
    rm1 = RmProcess("rm1", config, tmp_path / "rm1.log")
    rm2 = RmProcess("rm2", config, tmp_path / "rm2.log")
    try:
        await rm1.start()
        await until(lambda: "rm1" in rm3.links)
        # A session rm1 holds (put by rm3, an authenticated peer) ...
        rm3.put("rm1", AffinityEntry("session-1", "mcp1", "acme", [], 1.0, 2.0))
        assert "session-1" in await rm3.fresh_snapshot("rm1")
        # ... reaches rm2 from rm1 alone: rm2 merges rm1's snapshot before it reports ready.
        await rm2.start()
        await until(lambda: "rm2" in rm3.links)
        assert await rm3.fresh_snapshot("rm2") == {"session-1"}
        assert "replication link with rm1 (" in rm2.text() and "authenticated" in rm2.text()

        # Strangers without the secret, on both RMs' replication ports.
        forged = AffinityEntry("forged", "mcp-evil", "acme", [], 1.0, 9e9).to_dict()
        put = json.dumps({"t": "put", "entry": forged}).encode() + b"\n"
        nonce = ha_auth.new_nonce()
        wrong_key = ha_auth.Sealer(ha_auth.session_key(b"guess", "callvault-rm", nonce, nonce), "rm1")
        attempts = [
            [put],  # the protocol before authentication
            [LinkCodec.hello("rm1"), put],  # no nonce
            [LinkCodec.hello("rm1", nonce), LinkCodec.auth(b"guessed secret!!", nonce, "rm1", "dial"), put],
            [
                LinkCodec.hello("rm1", nonce),
                b'{"t":"auth","mac":"' + b"0" * 64 + b'"}\n',
                wrong_key.seal(put),
            ],
        ]
        for port in (rm_ports["rm2"][1], rm_ports["rm1"][1]):
            for lines in attempts:
                await _stranger(port, lines)
        assert await rm3.fresh_snapshot("rm2") == {"session-1"}
        assert await rm3.fresh_snapshot("rm1") == {"session-1"}
        for rm in (rm1, rm2):
            refused = [line for line in rm.text().splitlines() if "refused, connection dropped" in line]
            assert len(refused) == len(attempts), rm.text()
            assert all(" WARNING " in line and "127.0.0.1" in line for line in refused)
            assert f"{len(attempts)} authentication failure(s) so far" in refused[-1]
            assert "Traceback" not in rm.text()
        # The rm1 <-> rm2 link was never dropped nor replaced by a stranger, and both still run.
        assert rm2.text().count("replication link with rm1 (") == 1
        assert "replication link with rm1 down" not in rm2.text()
        assert rm1.proc is not None and rm1.proc.returncode is None
        assert rm2.proc is not None and rm2.proc.returncode is None
    finally:
        await rm2.stop()
        await rm1.stop()
        await rm3.close()


async def test_an_rm_pair_without_a_secret_refuses_to_start(
    tmp_path: Path, rm_ports: dict[str, tuple[int, int]]
) -> None:
    config = tmp_path / "callvault.toml"
    config.write_text(config_text(rm_ports, None))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", "resource-manager", "--config", str(config), "--name", "rm1",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if not k.startswith("CALLVAULT_")},
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 20.0)
    assert proc.returncode == 2, (out, err)
    assert b"configuration error: resource_manager.replication_secret is not set" in err
