"""The one-machine lab: every daemon on loopback, started as separate processes.

``callvault lab`` (what ``make run`` runs) writes a cluster configuration into the state directory
(``var/`` by default) the first time, with a default tenant, its API key and SIP users with random
passwords, then starts two Crypto Servers (sharing ``var/keystore``; no tenant is encrypted until
its IVR Profile names certificates, docs/CRYPTO.md), Web Services, the Recording Processor, two MCPs, the Resource Manager and the
SIP Server, each as its own ``callvault <daemon>`` process logging to ``var/log/<name>.log``. It
prints what runs and writes the same as JSON to ``var/lab.json`` for scripts. Ctrl-C stops the
daemons in reverse order, gracefully; a daemon that dies is restarted.

The :class:`Lab` class is also what the system tests use to run the real stack on free ports.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import secrets
import signal
import socket
import string
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services import config as config_mod
from services.cli import READY_MARK

log = logging.getLogger("callvault.lab")


@dataclass
class LabPorts:
    """The loopback ports of one lab."""

    sip: int = 5060
    resource_manager: int = 5070
    mcp: list[int] = field(default_factory=lambda: [5080, 5082])
    rtp_base: int = 20000
    rtp_per_mcp: int = 5000
    web: int = 8080
    #: the Crypto Server pair (active/active over one keystore directory)
    crypto: list[int] = field(default_factory=lambda: [8090, 8091])
    #: replication ports of the SIP Server pair (sip-server-a, sip-server-b; docs/HA.md)
    sip_replication: list[int] = field(default_factory=lambda: [5066, 5067])
    #: the second RM of the active/active pair, and both RMs' affinity replication ports
    rm2: int = 5072
    rm_replication: list[int] = field(default_factory=lambda: [5071, 5073])

    @classmethod
    def free(cls, mcps: int = 2) -> LabPorts:
        """Pick ports that are free on 127.0.0.1 now (UDP and TCP), for tests that run a lab."""
        taken: set[int] = set()
        ports = [free_port(taken) for _ in range(8 + mcps)]
        base = 30000 + secrets.randbelow(200) * 100
        return cls(
            sip=ports[0],
            resource_manager=ports[1],
            web=ports[2],
            sip_replication=ports[3:5],
            rm2=ports[5],
            rm_replication=ports[6:8],
            mcp=ports[8:],
            rtp_base=base,
            rtp_per_mcp=1000,
            crypto=[free_port(taken) for _ in range(2)],
        )


def free_port(taken: set[int] | None = None) -> int:
    """A port of 127.0.0.1 free for both TCP and UDP (SIP listens on both), not in ``taken``
    (to which it is added)."""
    taken = set() if taken is None else taken
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
        if port in taken:
            continue
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                udp.bind(("127.0.0.1", port))
        except OSError:
            continue
        taken.add(port)
        return port


def _password(n: int = 12) -> str:
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(n))


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string of ASCII text is a valid TOML basic string
    if isinstance(value, list) and all(not isinstance(v, dict) for v in value):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as a TOML value")


def to_toml(data: dict[str, Any]) -> str:
    """Write the cluster configuration's shape (tables, arrays of tables, scalars) as TOML."""
    lines: list[str] = []

    def emit_table(prefix: str, table: dict[str, Any], array: bool) -> None:
        lines.append(f"\n[[{prefix}]]" if array else f"\n[{prefix}]")
        nested: list[tuple[str, Any]] = []
        for key, value in table.items():
            if isinstance(value, dict) or (isinstance(value, list) and value and isinstance(value[0], dict)):
                nested.append((key, value))
            else:
                lines.append(f"{key} = {_toml_value(value)}")
        for key, value in nested:
            if isinstance(value, dict):
                emit_table(f"{prefix}.{key}", value, False)
            else:
                for item in value:
                    emit_table(f"{prefix}.{key}", item, True)

    for key, value in data.items():
        if isinstance(value, dict):
            emit_table(key, value, False)
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for item in value:
                emit_table(key, item, True)
        else:
            lines.insert(0, f"{key} = {_toml_value(value)}")
    return (
        "# callvault lab configuration (written by `callvault lab`; edit freely)\n"
        + "\n".join(lines).lstrip("\n")
        + "\n"
    )


def make_config(ports: LabPorts, *, users: int = 4) -> dict[str, Any]:
    """A fresh lab configuration: two tenants, SIP users with random passwords, every daemon on loopback."""
    default_users = [
        {"extension": str(1001 + i), "password": _password(), "display_name": f"Lab user {1001 + i}"}
        for i in range(users)
    ]
    acme_users = [
        {"extension": str(2001 + i), "password": _password(), "display_name": f"Acme user {2001 + i}"}
        for i in range(3)
    ]
    return {
        "sip_server": {
            "host": "127.0.0.1",
            "port": ports.sip,
            "realm": "callvault",
            "nonce_secret": secrets.token_hex(16),
            "resource_manager": f"127.0.0.1:{ports.resource_manager}",
            "resource_managers": [f"127.0.0.1:{ports.resource_manager}", f"127.0.0.1:{ports.rm2}"],
            # sip-server-a's view of the hot-standby pair; sip-server-b swaps them (daemon_specs)
            "replication_port": ports.sip_replication[0],
            "peer": f"127.0.0.1:{ports.sip_replication[1]}",
        },
        "resource_manager": {
            "host": "127.0.0.1",
            "port": ports.resource_manager,
            # the active/active pair sharing the session affinity (docs/HA.md), over a link
            # authenticated with this secret
            "replication_secret": secrets.token_hex(16),
            "instances": [
                {
                    "name": "rm1",
                    "host": "127.0.0.1",
                    "port": ports.resource_manager,
                    "replication_port": ports.rm_replication[0],
                },
                {
                    "name": "rm2",
                    "host": "127.0.0.1",
                    "port": ports.rm2,
                    "replication_port": ports.rm_replication[1],
                },
            ],
        },
        "mcp": [
            {
                "name": f"mcp{i + 1}",
                "host": "127.0.0.1",
                "port": port,
                "rtp_ip": "127.0.0.1",
                "rtp_port_min": ports.rtp_base + i * ports.rtp_per_mcp,
                "rtp_port_max": ports.rtp_base + (i + 1) * ports.rtp_per_mcp - 2,
                "spool_dir": f"mcp{i + 1}/spool",
            }
            for i, port in enumerate(ports.mcp)
        ],
        "storage": {"disk_root": "storage", "queue_dir": "queue"},
        "web_services": {
            "host": "127.0.0.1",
            "port": ports.web,
            "database": "metadata.sqlite3",
            "internal_token": secrets.token_urlsafe(24),
        },
        "recording_processor": {"web_services_url": f"http://127.0.0.1:{ports.web}"},
        "crypto_server": {
            "host": "127.0.0.1",
            "port": ports.crypto[0],
            "keystore_dir": "keystore",
            "internal_token": secrets.token_urlsafe(24),
            "admin_token": secrets.token_urlsafe(24),
            "urls": [f"http://127.0.0.1:{p}" for p in ports.crypto],
        },
        "tenants": [
            {
                "id": "default",
                "name": "Default tenant",
                "api_key": "cv_" + secrets.token_urlsafe(24),
                "domains": ["127.0.0.1", "localhost"],
                "policy": {"mode": "all"},
                "profile": {"name": "stereo-wav", "format": "wav", "channels": 2, "storage": "disk"},
                "users": default_users,
            },
            {
                "id": "acme",
                "name": "Acme Corp (records calls with extension 2001, mono)",
                "api_key": "cv_" + secrets.token_urlsafe(24),
                "domains": ["acme.lab"],
                "policy": {"mode": "pattern", "patterns": ["2001"]},
                "profile": {"name": "mono-wav", "format": "wav", "channels": 1, "storage": "disk"},
                "users": acme_users,
            },
        ],
    }


def add_missing_secrets(path: Path) -> bool:
    """Give a lab configuration written by an older version the secrets now required (the RM pair's
    ``replication_secret``), by inserting a line under its table: the rest of the file, comments
    included, stays as it is. Returns whether the file changed."""
    text = path.read_text()
    try:
        rm = tomllib.loads(text).get("resource_manager", {})
    except tomllib.TOMLDecodeError:
        return False  # config.load reports it
    if len(rm.get("instances", [])) < 2 or "replication_secret" in rm:
        return False
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.strip() == "[resource_manager]":
            lines.insert(i + 1, f'replication_secret = "{secrets.token_hex(16)}"\n')
            path.write_text("".join(lines))
            log.info("%s: added resource_manager.replication_secret (now required)", path)
            return True
    return False


def crypto_server_specs(cfg: config_mod.ClusterConfig) -> list[tuple[str, list[str]]]:
    """One Crypto Server per URL of ``crypto_server.urls`` (all on this machine), bound to its port."""
    specs = []
    for i, url in enumerate(cfg.crypto_server.instance_urls()):
        host, port = config_mod.parse_hostport(url.split("://", 1)[1], f"crypto_server.urls[{i}]")
        sets = ["--set", f"crypto_server.host={host}", "--set", f"crypto_server.port={port}"]
        specs.append((f"crypto-server{i + 1}", ["crypto-server", *sets]))
    return specs


# Start order: consumers of a service come after it; stop runs in reverse.
def daemon_specs(cfg: config_mod.ClusterConfig) -> list[tuple[str, list[str]]]:
    """(label, callvault arguments) of every daemon of the lab, in start order."""
    specs: list[tuple[str, list[str]]] = [
        *crypto_server_specs(cfg),
        ("web-services", ["web-services"]),
        ("recording-processor", ["recording-processor"]),
    ]
    specs += [(m.name, ["mcp", "--name", m.name]) for m in cfg.mcp]
    rms = cfg.resource_manager.instances
    specs += [
        (
            "resource-manager" if i == 0 else f"resource-manager-{i + 1}",
            ["resource-manager", "--name", rm.name],
        )
        for i, rm in enumerate(rms)
    ] or [("resource-manager", ["resource-manager"])]
    sip = cfg.sip_server
    if not sip.replication_port:
        return [*specs, ("sip-server", ["sip-server"])]
    # The hot-standby pair: the same [sip_server] (same SIP address), a = primary, b = standby
    # with the replication addresses swapped.
    peer_host, peer_port = config_mod.parse_hostport(sip.peer, "sip_server.peer")
    return [
        *specs,
        ("sip-server-a", ["sip-server", "--set", "sip_server.node_name=sip-server-a"]),
        (
            "sip-server-b",
            [
                "sip-server",
                *("--set", "sip_server.node_name=sip-server-b", "--set", "sip_server.role=standby"),
                *("--set", f"sip_server.replication_host={peer_host}"),
                *("--set", f"sip_server.replication_port={peer_port}"),
                *("--set", f"sip_server.peer={sip.replication_host}:{sip.replication_port}"),
            ],
        ),
    ]


class DaemonProcess:
    """One daemon of the lab as a child process with its own log file."""

    def __init__(self, label: str, args: list[str], config_path: Path, log_dir: Path) -> None:
        self.label = label
        self.args = args
        self.config_path = config_path
        self.log_path = log_dir / f"{label}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        logfile = open(self.log_path, "ab")  # handed to the child, closed here after Popen
        self._log_offset = logfile.tell()
        cmd = [
            sys.executable,
            "-m",
            "services.cli",
            *self.args[:1],
            "--config",
            str(self.config_path),
            *self.args[1:],
        ]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            cmd, stdout=logfile, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        logfile.close()

    def is_ready(self) -> bool:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_offset)
                return READY_MARK.encode() in f.read()
        except FileNotFoundError:
            return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def signal(self, signum: int) -> None:
        if self.alive():
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signum)

    def wait(self, timeout: float) -> bool:
        if self.proc is None:
            return True
        try:
            self.proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


class LabError(RuntimeError):
    """The lab could not be started."""


class Lab:
    """The whole stack on one machine, as separate processes sharing one state directory."""

    def __init__(
        self,
        var_dir: str | os.PathLike[str],
        *,
        ports: LabPorts | None = None,
        fresh: bool = False,
        config_patch: dict[str, Any] | None = None,
    ) -> None:
        self.var_dir = Path(var_dir).resolve()
        self.config_path = self.var_dir / "lab.toml"
        self.var_dir.mkdir(parents=True, exist_ok=True)
        if fresh or not self.config_path.exists():
            data = make_config(ports or LabPorts())
            for dotted, value in (config_patch or {}).items():
                config_mod._apply_override(data, dotted, value)
            self.config_path.write_text(to_toml(data))
            os.chmod(self.config_path, 0o600)
        else:
            add_missing_secrets(self.config_path)
        self.config = config_mod.load(self.config_path)
        self.daemons = {
            label: DaemonProcess(label, args, self.config_path, self.var_dir / "log")
            for label, args in daemon_specs(self.config)
        }

    # Lifecycle -------------------------------------------------------------------------------
    def start(self, timeout: float = 20.0) -> None:
        """Start every daemon in order, each once the one before it reports ready."""
        for d in self.daemons.values():
            self.start_daemon(d.label, timeout)
        self.write_info()

    def start_daemon(self, label: str, timeout: float = 20.0) -> None:
        d = self.daemons[label]
        d.start()
        deadline = time.monotonic() + timeout
        while not d.is_ready():
            if not d.alive():
                self.stop()
                raise LabError(f"{label} exited during start-up:\n{d.tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise LabError(f"{label} did not report ready within {timeout:.0f} s:\n{d.tail()}")
            time.sleep(0.05)

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the daemons in reverse order: SIGTERM, then SIGKILL after ``timeout``."""
        for d in reversed(list(self.daemons.values())):
            if d.alive():
                d.signal(signal.SIGTERM)
                if not d.wait(timeout):
                    log.warning("%s did not stop within %.0f s; killing it", d.label, timeout)
                    d.signal(signal.SIGKILL)
                    d.wait(5)

    def kill(self, label: str, signum: int = signal.SIGKILL) -> None:
        """Kill one daemon (failure tests)."""
        d = self.daemons[label]
        d.signal(signum)
        d.wait(10)

    def __enter__(self) -> Lab:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # What the lab offers ---------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        cfg = self.config
        sip = cfg.sip_server
        tenants = []
        for t in cfg.tenants:
            domain = t.domains[0] if t.domains else sip.host
            tenants.append(
                {
                    "id": t.id,
                    "name": t.name,
                    "api_key": t.api_key,
                    "domain": domain,
                    "policy": dataclasses.asdict(t.policy),
                    "profile": t.profile.to_dict(),
                    "users": [
                        {
                            "extension": u.extension,
                            "password": u.password,
                            "display_name": u.display_name,
                            "aor": f"sip:{u.extension}@{domain}",
                        }
                        for u in t.users
                    ],
                }
            )
        default = tenants[0] if tenants else {}
        return {
            "sip": {
                "host": sip.host,
                "port": sip.port,
                "transports": ["udp", "tcp"],
                "realm": sip.realm,
                "domain": default.get("domain"),
                "servers": {
                    label: (
                        "primary (active), replication "
                        f"{sip.replication_host}:{sip.replication_port}, peer {sip.peer}"
                        if label == "sip-server-a"
                        else f"hot standby, replication {sip.peer}"
                    )
                    for label in self.daemons
                    if label.startswith("sip-server-")
                },
            },
            "api": {
                "base_url": f"http://{cfg.web_services.host}:{cfg.web_services.port}/api/v1",
                "web": f"http://{cfg.web_services.host}:{cfg.web_services.port}/",
                "tenant": default.get("id"),
                "api_key": default.get("api_key"),
            },
            "users": default.get("users", []),
            "tenants": tenants,
            "storage": str(cfg.path(cfg.storage.disk_root)),
            "config": str(self.config_path),
            "logs": str(self.var_dir / "log"),
            "daemons": {label: {"pid": d.pid, "log": str(d.log_path)} for label, d in self.daemons.items()},
        }

    def write_info(self) -> Path:
        path = self.var_dir / "lab.json"
        path.write_text(json.dumps(self.info(), indent=2) + "\n")
        os.chmod(path, 0o600)
        return path

    def summary(self) -> str:
        info = self.info()
        cfg = self.config
        out = ["", "callvault lab is running", ""]
        out.append(
            f"  SIP Server        sip:{info['sip']['host']}:{info['sip']['port']} (UDP, TCP)  realm {info['sip']['realm']}"
        )
        for label, role in info["sip"].get("servers", {}).items():
            out.append(f"    {label:<15} {role}")
        rms = [(i.host, i.port, i.name) for i in cfg.resource_manager.instances]
        for host, port, name in rms or [(cfg.resource_manager.host, cfg.resource_manager.port, "")]:
            out.append(f"  Resource Manager  sip:{host}:{port}  {name}")
        for m in cfg.mcp:
            out.append(
                f"  MCP {m.name:<13} sip:{m.host}:{m.port}  RTP {m.rtp_ip}:{m.rtp_port_min}-{m.rtp_port_max}"
            )
        out.append(f"  Web Services      {info['api']['web']}  (API {info['api']['base_url']})")
        for url in cfg.crypto_server.instance_urls():
            out.append(f"  Crypto Server     {url}  keystore {cfg.path(cfg.crypto_server.keystore_dir)}")
        out.append(f"  Storage           {info['storage']}")
        out.append(f"  Logs              {info['logs']}")
        for t in info["tenants"]:
            out += [
                "",
                f"  Tenant {t['id']!r} ({t['name']}), SIP domain {t['domain']}, recording policy {t['policy']['mode']}",
                f"    API key  {t['api_key']}",
            ]
            for u in t["users"]:
                out.append(f"    user {u['extension']}  password {u['password']}  ({u['aor']})")
        out += [
            "",
            f"  The same as JSON: {self.var_dir / 'lab.json'}",
            f"  Try:  curl -H 'Authorization: Bearer {info['api']['api_key']}' {info['api']['base_url']}/recordings",
            "",
            "Press Ctrl-C to stop.",
            "",
        ]
        return "\n".join(out)


def main(var_dir: str = "var", fresh: bool = False) -> int:
    """`callvault lab`: start everything, print the lab, supervise until Ctrl-C."""
    try:
        lab = Lab(var_dir, fresh=fresh)
    except config_mod.ConfigError as exc:
        print(
            f"callvault lab: configuration error in {Path(var_dir) / 'lab.toml'}: {exc}\n"
            f"  (fix it, or start over with `callvault lab --fresh`)",
            file=sys.stderr,
        )
        return 2
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        if stopping:
            for d in lab.daemons.values():
                d.signal(signal.SIGKILL)
            os._exit(130)
        stopping = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        try:
            lab.start()
        except LabError as exc:
            print(f"callvault lab: {exc}", file=sys.stderr)
            return 1
        print(lab.summary(), flush=True)
        restarts: dict[str, float] = {}
        while True:
            time.sleep(0.5)
            for d in lab.daemons.values():
                if not d.alive():
                    code = d.proc.returncode if d.proc else None
                    log.error(
                        "%s exited (code %s); restarting it. Last log lines:\n%s", d.label, code, d.tail(10)
                    )
                    if time.monotonic() - restarts.get(d.label, 0.0) < 5.0:
                        time.sleep(2.0)  # do not spin on a daemon that cannot start
                    restarts[d.label] = time.monotonic()
                    try:
                        lab.start_daemon(d.label)
                    except LabError as exc:
                        log.error("%s", exc)
                        return 1
                    lab.write_info()
    except KeyboardInterrupt:
        print("\nstopping the lab ...", flush=True)
        lab.stop()
        print("stopped.", flush=True)
        return 0
