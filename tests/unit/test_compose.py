"""The docker-compose lab: docker-compose.yml, deploy/compose/callvault.toml, deploy/Dockerfile.

No Docker engine is needed: ``docker-compose config`` (Debian's docker-compose 1.29, installed by
deploy/install-debian-packages.sh) validates the file and prints it normalised; that output is read
with the small YAML-subset reader below (the project has no YAML dependency) and checked against the
callvault CLI and the cluster configuration: every daemon command parses and names a real
subcommand, the configuration loads, ports do not collide, state is shared through one volume.
"""

from __future__ import annotations

import contextlib
import http.server
import importlib.util
import ipaddress
import os
import re
import shlex
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from services import config as config_mod
from services.cli import DAEMONS, build_parser

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
COMPOSE_CONFIG = ROOT / "deploy" / "compose" / "callvault.toml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
HEALTHCHECK = ROOT / "deploy" / "compose" / "healthcheck.py"
DATA_DIR = "/var/lib/callvault"  # where the shared volume is mounted in callvault containers

EXPECTED_SERVICES = {
    "minio",
    "minio-init",
    "sip-server-a",
    "sip-server-b",
    "resource-manager-a",
    "resource-manager-b",
    "mcp1",
    "mcp2",
    "mcp3",
    "recording-processor-a",
    "recording-processor-b",
    "web-services-a",
    "web-services-b",
    "crypto-server-a",
    "crypto-server-b",
    "cassandra-1",
    "cassandra-2",
    "cassandra-3",
}


# --------------------------------------------------------------------------------------------------
# A reader for the YAML that `docker-compose config` prints (PyYAML's block style): block mappings
# and sequences (also sequences at their key's indentation), plain / single- / double-quoted scalars
# folded over several lines, `{}` and `[]`. Anything else raises, so it never guesses.


class YamlSubsetError(ValueError):
    pass


_KEY_RE = re.compile(
    r"""^(?P<key>'(?:[^']|'')*'|"(?:[^"\\]|\\.)*"|[^\s'"\-?:#&*!|>%@`{}\[\],][^:]*?|-[^\s:][^:]*?):(?:[ ]+(?P<rest>.*))?$"""
)
_INT_RE = re.compile(r"^[-+]?(0|[1-9][0-9]*)$")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "0": "\0", '"': '"', "\\": "\\", "/": "/", " ": " ", "e": "\x1b"}


def _unquote_double(text: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        code = text[i + 1]
        if code in _ESCAPES:
            out.append(_ESCAPES[code])
            i += 2
        elif code in "xuU":
            width = {"x": 2, "u": 4, "U": 8}[code]
            out.append(chr(int(text[i + 2 : i + 2 + width], 16)))
            i += 2 + width
        else:
            raise YamlSubsetError(f"unsupported escape \\{code}")
    return "".join(out)


def _scalar(first: str, more: Sequence[tuple[int, str]] = ()) -> Any:
    """One scalar from its first line's text and its continuation lines (blank lines before, text).

    Folding: a line break between two lines is a space, n blank lines are n newlines; in a
    double-quoted scalar a line ending in an odd number of backslashes continues without a space.
    """
    quoted = first.startswith('"')
    text = first
    for blanks, piece in more:
        trailing = len(text) - len(text.rstrip("\\"))
        if quoted and trailing % 2 == 1:
            text = text[:-1] + piece  # escaped line break
        else:
            text += ("\n" * blanks if blanks else " ") + piece
    if quoted:
        if len(text) < 2 or not text.endswith('"'):
            raise YamlSubsetError(f"unterminated double-quoted scalar {text!r}")
        return _unquote_double(text[1:-1])
    if first.startswith("'"):
        if len(text) < 2 or not text.endswith("'"):
            raise YamlSubsetError(f"unterminated single-quoted scalar {text!r}")
        return text[1:-1].replace("''", "'")
    if text == "{}":
        return {}
    if text == "[]":
        return []
    if text[0] in "&*!|>{[%@`#":
        raise YamlSubsetError(f"unsupported YAML construct: {text!r}")
    if re.search(r":( |$)| #", text):
        raise YamlSubsetError(f"not a plain scalar: {text!r}")
    if text in ("null", "~"):
        return None
    if text in ("true", "false"):
        return text == "true"
    if _INT_RE.match(text):
        return int(text)
    return text


class _Reader:
    def __init__(self, text: str) -> None:
        self.lines: list[tuple[int, str]] = []
        self.blanks: list[int] = []  # blank lines before each line (they matter in folded scalars)
        blanks = 0
        for raw in text.splitlines():
            if not raw.strip():
                blanks += 1
                continue
            if raw.lstrip().startswith("#"):
                continue
            if "\t" in raw[: len(raw) - len(raw.lstrip())]:
                raise YamlSubsetError(f"tab in indentation: {raw!r}")
            self.lines.append((len(raw) - len(raw.lstrip(" ")), raw.strip()))
            self.blanks.append(blanks)
            blanks = 0

    @staticmethod
    def _is_item(content: str) -> bool:
        return content == "-" or content.startswith("- ")

    def node(self, i: int, indent: int) -> tuple[Any, int]:
        if self._is_item(self.lines[i][1]):
            return self.sequence(i, indent)
        return self.mapping(i, indent)

    def continuation(self, i: int, indent: int) -> tuple[list[tuple[int, str]], int]:
        """Lines after ``i`` indented deeper than ``indent``: the rest of a folded scalar."""
        pieces: list[tuple[int, str]] = []
        j = i + 1
        while j < len(self.lines) and self.lines[j][0] > indent:
            pieces.append((self.blanks[j], self.lines[j][1]))
            j += 1
        return pieces, j

    def value_after_key(self, i: int, indent: int) -> tuple[Any, int]:
        """The block value of a key on line ``i - 1`` at ``indent`` with nothing after the colon."""
        if i < len(self.lines):
            ind, content = self.lines[i]
            if ind > indent:
                return self.node(i, ind)
            if ind == indent and self._is_item(content):
                return self.sequence(i, indent)
        return None, i

    def mapping(self, i: int, indent: int) -> tuple[dict[str, Any], int]:
        result: dict[str, Any] = {}
        while i < len(self.lines) and self.lines[i][0] == indent and not self._is_item(self.lines[i][1]):
            content = self.lines[i][1]
            m = _KEY_RE.match(content)
            if not m:
                raise YamlSubsetError(f"expected 'key: value', got {content!r}")
            key = _scalar(m.group("key"))
            if not isinstance(key, str):
                key = str(key)
            if key in result:
                raise YamlSubsetError(f"duplicate key {key!r}")
            rest = m.group("rest")
            if rest:
                more, i = self.continuation(i, indent)
                result[key] = _scalar(rest, more)
            else:
                result[key], i = self.value_after_key(i + 1, indent)
        if i < len(self.lines) and self.lines[i][0] > indent:
            raise YamlSubsetError(f"unexpected indentation: {self.lines[i][1]!r}")
        return result, i

    def sequence(self, i: int, indent: int) -> tuple[list[Any], int]:
        result: list[Any] = []
        while i < len(self.lines) and self.lines[i][0] == indent and self._is_item(self.lines[i][1]):
            content = self.lines[i][1][1:].lstrip(" ")
            if not content:
                value, i = self.value_after_key(i + 1, indent)
                result.append(value)
            elif _KEY_RE.match(content):
                # "- key: value" opens a mapping whose keys sit two columns deeper
                self.lines[i] = (indent + 2, content)
                value, i = self.mapping(i, indent + 2)
                result.append(value)
            elif self._is_item(content):
                raise YamlSubsetError(f"nested inline sequence not supported: {content!r}")
            else:
                more, i = self.continuation(i, indent)
                result.append(_scalar(content, more))
        return result, i


def parse_yaml_subset(text: str) -> Any:
    reader = _Reader(text)
    if not reader.lines:
        return None
    value, i = reader.node(0, reader.lines[0][0])
    if i != len(reader.lines):
        raise YamlSubsetError(f"unparsed text from {reader.lines[i][1]!r}")
    return value


def test_yaml_subset_reader() -> None:
    text = (
        "services:\n"
        "  a:\n"
        "    command:\n"
        "    - mcp\n"
        "    - --name\n"
        "    - 'it''s'\n"
        "    - plain scalar folded\n"
        "      over two lines\n"
        '    - "double \\"quoted\\"\n'
        '      folded"\n'
        "    - :9001\n"
        "    depends_on:\n"
        "      b:\n"
        "        condition: service_healthy\n"
        "    retries: 3\n"
        "    init: true\n"
        "    env: {}\n"
        "    ports:\n"
        "    - published: 9000\n"
        "      target: 9000\n"
        "    - 127.0.0.1:9042:9042/tcp\n"
        "version: '3.9'\n"
        "volumes:\n"
        "  data: {}\n"
    )
    assert parse_yaml_subset(text) == {
        "services": {
            "a": {
                "command": [
                    "mcp",
                    "--name",
                    "it's",
                    "plain scalar folded over two lines",
                    'double "quoted" folded',
                    ":9001",
                ],
                "depends_on": {"b": {"condition": "service_healthy"}},
                "retries": 3,
                "init": True,
                "env": {},
                "ports": [{"published": 9000, "target": 9000}, "127.0.0.1:9042:9042/tcp"],
            }
        },
        "version": "3.9",
        "volumes": {"data": {}},
    }
    for bad in ("a: &anchor x\n", "a: |\n  block\n", "a: [1, 2]\n", "a: 1\n  b: 2\n"):
        with pytest.raises(YamlSubsetError):
            parse_yaml_subset(bad)


# --------------------------------------------------------------------------------------------------
# docker-compose


def _docker_compose() -> str:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail(
            "docker-compose is not installed, so docker-compose.yml cannot be validated. Install it with "
            "`bash deploy/install-debian-packages.sh` (or `apt-get install docker-compose`; Debian's 1.29 "
            "validates files without a Docker engine).",
            pytrace=False,
        )
    return exe


def _run_compose(*args: str) -> subprocess.CompletedProcess[str]:
    # A clean environment: the file's ${VAR:-default} defaults are what is checked, not whatever the
    # caller's shell happens to export.
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")}
    return subprocess.run(
        [_docker_compose(), "--project-directory", str(ROOT), "-f", str(COMPOSE_FILE), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_docker_compose_config_validates() -> None:
    proc = _run_compose("config", "-q")
    assert proc.returncode == 0, f"docker-compose config -q failed:\n{proc.stderr}{proc.stdout}"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    proc = _run_compose("config")
    assert proc.returncode == 0, f"docker-compose config failed:\n{proc.stderr}"
    data = parse_yaml_subset(proc.stdout)
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


def _is_callvault(service: dict[str, Any]) -> bool:
    build = service.get("build") or {}
    return isinstance(build, dict) and build.get("dockerfile") == "deploy/Dockerfile"


@pytest.fixture(scope="module")
def daemons(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every callvault service: its parsed command line and the configuration it runs with."""
    out: dict[str, dict[str, Any]] = {}
    for name, service in compose["services"].items():
        if not _is_callvault(service):
            continue
        command = service.get("command")
        if isinstance(command, str):
            command = shlex.split(command)
        assert isinstance(command, list) and command, f"{name}: no command"
        try:
            args = build_parser().parse_args([str(c) for c in command])
        except SystemExit:
            pytest.fail(f"{name}: `callvault {' '.join(map(str, command))}` is not a valid command line")
        overrides = {}
        for item in args.set if hasattr(args, "set") else []:
            key, _, value = item.partition("=")
            overrides[key] = value
        out[name] = {"service": service, "command": command, "args": args, "overrides": overrides}
    return out


def test_services_of_the_lab(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == EXPECTED_SERVICES


def test_every_command_is_a_real_callvault_daemon(daemons: dict[str, dict[str, Any]]) -> None:
    assert len(daemons) == 13
    for name, d in daemons.items():
        assert d["command"][0] in DAEMONS, f"{name}: {d['command'][0]!r} is not a callvault daemon"
        assert d["args"].command == d["command"][0]


def test_compose_config_file_loads() -> None:
    cfg = config_mod.load(COMPOSE_CONFIG, environ={})
    assert [m.name for m in cfg.mcp] == ["mcp1", "mcp2", "mcp3"]
    assert cfg.web_services.internal_token and cfg.sip_server.nonce_secret
    # both RMs read this file: one secret authenticates their replication link
    assert len(cfg.resource_manager.instances) == 2 and cfg.resource_manager.replication_secret
    assert cfg.tenants


def _mount(service: dict[str, Any], target: str) -> str | None:
    """The source of the volume or bind mounted at ``target`` (short syntax, as config prints it)."""
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            if volume.get("target") == target:
                return str(volume.get("source"))
            continue
        parts = str(volume).split(":")
        if len(parts) >= 2 and parts[1] == target:
            return parts[0]
    return None


def _config_of(name: str, d: dict[str, Any]) -> config_mod.ClusterConfig:
    source = _mount(d["service"], d["args"].config)
    assert source is not None, f"{name}: --config {d['args'].config} is not mounted into the container"
    assert Path(source).resolve() == COMPOSE_CONFIG, f"{name}: mounts {source}, not {COMPOSE_CONFIG}"
    try:
        cfg = config_mod.load(COMPOSE_CONFIG, overrides=d["overrides"], environ={})
        if d["args"].command == "mcp":
            assert d["args"].name, f"{name}: mcp needs --name"
            cfg.mcp_named(d["args"].name)
    except config_mod.ConfigError as exc:
        pytest.fail(f"{name}: its configuration does not load: {exc}")
    return cfg


def _healthcheck_target(service: dict[str, Any]) -> list[str]:
    test = (service.get("healthcheck") or {}).get("test") or []
    return [str(t) for t in test]


def test_daemons_use_host_network_and_distinct_ports(
    compose: dict[str, Any], daemons: dict[str, dict[str, Any]]
) -> None:
    taken: dict[tuple[str, int], str] = {}  # (proto, port) -> who binds it

    def claim(proto: str, port: int, who: str) -> None:
        other = taken.setdefault((proto, port), who)
        assert other == who, f"{proto} port {port} is used by both {other} and {who}"

    rms: set[str] = set()
    webs: set[str] = set()
    cryptos: set[str] = set()
    replication: dict[str, tuple[str, str]] = {}  # SIP Server -> (its replication address, its peer)
    for name, d in daemons.items():
        service = d["service"]
        assert service.get("network_mode") == "host", f"{name} must run with network_mode: host"
        assert not service.get("ports"), f"{name}: host networking publishes nothing"
        cfg = _config_of(name, d)
        command = d["args"].command
        health = _healthcheck_target(service)
        if command == "sip-server":
            s = cfg.sip_server
            if s.replication_port:
                # the hot-standby pair shares the SIP address; each has its replication port
                for proto in ("udp", "tcp"):
                    claim(proto, s.port, "the SIP Server pair")
                claim("tcp", s.replication_port, name)
                replication[name] = (f"{s.replication_host}:{s.replication_port}", s.peer)
                target = ["tcp", f"{s.replication_host}:{s.replication_port}"]
                assert health[-2:] == target, f"{name}: healthcheck {health}"
            else:
                for proto in ("udp", "tcp"):
                    claim(proto, s.port, name)
                assert health[-2:] == ["sip", f"{s.host}:{s.port}"], f"{name}: healthcheck {health}"
        elif command == "resource-manager":
            r = cfg.resource_manager.instance(d["args"].name) or cfg.resource_manager
            for proto in ("udp", "tcp"):
                claim(proto, r.port, name)
            if isinstance(r, config_mod.RmInstance):  # the active/active pair replicates affinity
                claim("tcp", r.replication_port, name)
            rms.add(f"{r.host}:{r.port}")
            assert health[-2:] == ["sip", f"{r.host}:{r.port}"], f"{name}: healthcheck {health}"
        elif command == "mcp":
            m = cfg.mcp_named(d["args"].name)
            for proto in ("udp", "tcp"):
                claim(proto, m.port, name)
            for port in range(m.rtp_port_min, m.rtp_port_max + 2):  # RTCP on port + 1
                claim("udp", port, name)
            assert health[-2:] == ["sip", f"{m.host}:{m.port}"], f"{name}: healthcheck {health}"
        elif command == "web-services":
            w = cfg.web_services
            claim("tcp", w.port, name)
            webs.add(f"http://{w.host}:{w.port}")
            assert health[-2:] == ["http", f"http://{w.host}:{w.port}/healthz"], (
                f"{name}: healthcheck {health}"
            )
        elif command == "crypto-server":
            c = cfg.crypto_server
            claim("tcp", c.port, name)
            cryptos.add(f"http://{c.host}:{c.port}")
            assert health[-2:] == ["http", f"http://{c.host}:{c.port}/healthz"], (
                f"{name}: healthcheck {health}"
            )
    # every port published by the non-host services is free of the daemons' ports too
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            spec = port if isinstance(port, str) else f"{port.get('published')}:{port.get('target')}"
            pm = re.fullmatch(r"(?:(?P<ip>[0-9.]+):)?(?P<published>\d+):\d+(?:/(?P<proto>tcp|udp))?", spec)
            assert pm, f"{name}: cannot read port {spec!r}"
            assert pm["ip"] and ipaddress.ip_address(pm["ip"]).is_loopback, (
                f"{name}: publish on 127.0.0.1 only"
            )
            claim(pm["proto"] or "tcp", int(pm["published"]), name)
    # the SIP Servers use an RM of the lab, the Recording Processors a Web Services of the lab
    for name, d in daemons.items():
        cfg = _config_of(name, d)
        if d["args"].command == "sip-server":
            assert cfg.sip_server.resource_manager in rms, f"{name}: RM {cfg.sip_server.resource_manager}"
            assert set(cfg.sip_server.resource_managers) == rms, (
                f"{name}: uses {cfg.sip_server.resource_managers}"
            )
        if d["args"].command == "recording-processor":
            assert cfg.recording_processor.web_services_url.rstrip("/") in webs, name
    # the two instances of a pair talk to different peers
    assert len(rms) == 2 and len(webs) == 2
    # the SIP Servers are one hot-standby pair, each the other's peer
    (a_addr, a_peer), (b_addr, b_peer) = replication["sip-server-a"], replication["sip-server-b"]
    assert (a_peer, b_peer) == (b_addr, a_addr), replication
    # Web Services asks exactly the lab's two Crypto Servers
    urls = config_mod.load(COMPOSE_CONFIG, environ={}).crypto_server.instance_urls()
    assert set(urls) == cryptos and len(cryptos) == 2


def test_state_is_shared_through_one_volume(
    compose: dict[str, Any], daemons: dict[str, dict[str, Any]]
) -> None:
    sources = set()
    for name, d in daemons.items():
        if d["args"].command not in ("mcp", "recording-processor", "web-services"):
            continue
        source = _mount(d["service"], DATA_DIR)
        assert source, f"{name} does not mount the shared volume at {DATA_DIR}"
        sources.add(source)
        cfg = _config_of(name, d)
        paths = [cfg.storage.disk_root, cfg.storage.queue_dir, cfg.web_services.database]
        paths += [m.spool_dir for m in cfg.mcp]
        for p in paths:
            assert str(cfg.path(p)).startswith(DATA_DIR + "/"), f"{p} is not on the shared volume {DATA_DIR}"
    assert len(sources) == 1, f"callvault daemons mount different volumes: {sources}"
    (volume,) = sources
    assert volume in (compose.get("volumes") or {}), f"{volume} is not a named volume"


def test_minio_bucket_init_and_cassandra_ring(compose: dict[str, Any]) -> None:
    services = compose["services"]
    init = services["minio-init"]
    assert "minio/mc" in init["image"]
    assert init["depends_on"]["minio"]["condition"] == "service_healthy"
    assert "mc mb" in " ".join(map(str, init["command"]))
    assert init.get("restart") == "no"
    for i in (1, 2, 3):
        node = services[f"cassandra-{i}"]
        assert node["image"].startswith("cassandra:4.1")
        seeds = node["environment"]["CASSANDRA_SEEDS"].split(",")
        assert seeds and all(s in services for s in seeds)
        assert node["environment"]["CASSANDRA_CLUSTER_NAME"] == "callvault"


# --------------------------------------------------------------------------------------------------
# Image and install script


def test_dockerfile() -> None:
    text = DOCKERFILE.read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert froms and all(f == "python:3.11-slim-bookworm" for f in froms), froms
    assert re.search(r"apt-get install[^\n]*\bgcc\b", text)
    assert re.search(r"pip install -c constraints\.txt \.", text)
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must run as a non-root user"
    assert re.findall(r"^ENTRYPOINT\s+(.+)$", text, re.M)[-1].strip() == '["callvault"]'
    for src in re.findall(r"^COPY\s+(?!--from)(\S+)\s+\S+$", text, re.M):
        assert src == "." or (ROOT / src).exists(), f"COPY {src}: no such file"
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    for needed in ("pyproject.toml", "setup.py", "constraints.txt", "README.md", "services", "rtp_core"):
        assert needed not in ignored, f".dockerignore excludes {needed}, which the image build needs"


def test_install_script_installs_docker_compose() -> None:
    text = (ROOT / "deploy" / "install-debian-packages.sh").read_text()
    m = re.search(r"^pkgs=\((.*)\)$", text, re.M)
    assert m and "docker-compose" in m.group(1).split()


# --------------------------------------------------------------------------------------------------
# The container health check script


@pytest.fixture(scope="module")
def healthcheck() -> Any:
    spec = importlib.util.spec_from_file_location("callvault_healthcheck", HEALTHCHECK)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _sip_responder(status_line: str) -> Iterator[int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(5)

    def serve() -> None:
        with contextlib.suppress(OSError):
            data, peer = sock.recvfrom(65535)
            assert data.startswith(b"OPTIONS sip:")
            sock.sendto(b"SIP/2.0 100 Trying\r\nContent-Length: 0\r\n\r\n", peer)
            sock.sendto(f"{status_line}\r\nContent-Length: 0\r\n\r\n".encode(), peer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield sock.getsockname()[1]
    finally:
        thread.join(5)
        sock.close()


def test_healthcheck_sip(healthcheck: Any) -> None:
    with _sip_responder("SIP/2.0 200 OK") as port:
        assert healthcheck.main(["sip", f"127.0.0.1:{port}"]) == 0
    with _sip_responder("SIP/2.0 503 Service Unavailable") as port:
        assert healthcheck.main(["sip", f"127.0.0.1:{port}"]) == 1


def test_healthcheck_tcp(healthcheck: Any) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert healthcheck.main(["tcp", f"127.0.0.1:{port}"]) == 0
    assert healthcheck.main(["tcp", f"127.0.0.1:{port}"]) == 1  # closed: refused


def test_healthcheck_http(healthcheck: Any) -> None:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/healthz" else 503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        assert healthcheck.main(["http", f"http://127.0.0.1:{port}/healthz"]) == 0
        assert healthcheck.main(["http", f"http://127.0.0.1:{port}/other"]) == 1
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
