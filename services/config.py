"""One typed configuration for the whole cluster.

A cluster is described by one TOML file; every daemon loads it with :func:`load` and picks its own
section. Values can be overridden by environment variables named ``CALLVAULT_<SECTION>_<FIELD>``
(for example ``CALLVAULT_WEB_SERVICES_PORT=8081``) and by ``--set section.field=value`` on the CLI.
Every defect is reported as a :class:`ConfigError` that names the field.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_PREFIX = "CALLVAULT_"


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the field."""


@dataclass
class RecordingPolicy:
    """Which calls of a tenant are recorded.

    ``mode`` is ``all``, ``none`` or ``pattern``; with ``pattern`` a call is recorded when the
    caller's or the callee's number (user part) fully matches one of ``patterns`` (regular
    expressions).
    """

    mode: str = "all"
    patterns: list[str] = field(default_factory=list)

    def validate(self, where: str) -> None:
        if self.mode not in ("all", "none", "pattern"):
            raise ConfigError(f"{where}.mode must be 'all', 'none' or 'pattern', not {self.mode!r}")
        for i, pattern in enumerate(self.patterns):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"{where}.patterns[{i}] is not a valid regular expression: {exc}") from None
        if self.mode == "pattern" and not self.patterns:
            raise ConfigError(f"{where}.patterns must not be empty when mode is 'pattern'")

    def should_record(self, caller: str, callee: str) -> bool:
        """Return True when a call from ``caller`` to ``callee`` must be recorded."""
        if self.mode == "all":
            return True
        if self.mode == "none":
            return False
        return any(re.fullmatch(p, caller) or re.fullmatch(p, callee) for p in self.patterns)


@dataclass
class IvrProfile:
    """Recording parameters the Resource Manager hands to the MCP for a tenant's sessions."""

    name: str = "default"
    format: str = "wav"
    channels: int = 2
    storage: str = "disk"
    reorder_ms: int = 100
    #: X.509 PEM files (RSA >= 2048 bits) whose public keys wrap each recording's data key (several
    #: during a key rotation); empty = recordings stored unencrypted. Relative paths are resolved
    #: against the config file's directory at load time (see services/storage/envelope.py).
    certificates: list[str] = field(default_factory=list)

    def validate(self, where: str) -> None:
        if self.format not in ("wav", "mp3", "opus", "flac"):
            # wav: rtp_core's own output; the others are encoded by the MCP (services/mcp/transcode.py)
            raise ConfigError(f"{where}.format must be 'wav', 'mp3', 'opus' or 'flac', not {self.format!r}")
        if self.channels not in (1, 2):
            raise ConfigError(f"{where}.channels must be 1 (mono mix) or 2 (stereo), not {self.channels!r}")
        if self.storage not in ("disk", "s3"):
            raise ConfigError(f"{where}.storage must be 'disk' or 's3', not {self.storage!r}")
        if not 20 <= self.reorder_ms <= 500:
            raise ConfigError(f"{where}.reorder_ms must be between 20 and 500, not {self.reorder_ms!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class RetentionRule:
    """A tenant's retention rule: recordings older than ``max_age_days`` are purged (audio and metadata).

    ``labels``: the rule applies only to recordings carrying at least one of them (empty: to all);
    ``exempt_labels``: recordings carrying any of them are kept by this rule. A recording is purged
    when any of its tenant's rules says so.
    """

    max_age_days: int
    labels: list[str] = field(default_factory=list)
    exempt_labels: list[str] = field(default_factory=list)

    def validate(self, where: str) -> None:
        if self.max_age_days < 1:
            raise ConfigError(f"{where}.max_age_days must be at least 1, not {self.max_age_days!r}")
        for name in ("labels", "exempt_labels"):
            for i, label in enumerate(getattr(self, name)):
                if not label:
                    raise ConfigError(f"{where}.{name}[{i}] must not be empty")
        both = set(self.labels) & set(self.exempt_labels)
        if both:
            raise ConfigError(f"{where}: label {sorted(both)[0]!r} is in both labels and exempt_labels")


@dataclass
class User:
    """A SIP user (extension) of a tenant."""

    extension: str
    password: str
    display_name: str = ""

    def validate(self, where: str) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.+\-]+", self.extension):
            raise ConfigError(f"{where}.extension {self.extension!r} is not a valid SIP user part")
        if not self.password:
            raise ConfigError(f"{where}.password must not be empty")


@dataclass
class Tenant:
    """A customer: its SIP domains, users, API key, recording policy and IVR Profile."""

    id: str
    api_key: str
    name: str = ""
    domains: list[str] = field(default_factory=list)
    users: list[User] = field(default_factory=list)
    policy: RecordingPolicy = field(default_factory=RecordingPolicy)
    profile: IvrProfile = field(default_factory=IvrProfile)
    retention: list[RetentionRule] = field(default_factory=list)

    def validate(self, where: str) -> None:
        for i, rule in enumerate(self.retention):
            rule.validate(f"{where}.retention[{i}]")
        if not re.fullmatch(r"[a-z0-9][a-z0-9_\-]{0,62}", self.id):
            raise ConfigError(f"{where}.id {self.id!r} must be lower-case letters, digits, '-' or '_'")
        if len(self.api_key) < 16:
            raise ConfigError(f"{where}.api_key must be at least 16 characters")
        seen: set[str] = set()
        for i, user in enumerate(self.users):
            user.validate(f"{where}.users[{i}]")
            if user.extension in seen:
                raise ConfigError(f"{where}.users[{i}].extension {user.extension!r} is listed twice")
            seen.add(user.extension)
        self.policy.validate(f"{where}.policy")
        self.profile.validate(f"{where}.profile")

    def user(self, extension: str) -> User | None:
        return next((u for u in self.users if u.extension == extension), None)


@dataclass
class SipServerConfig:
    """The SIP Server: registrar and B2BUA."""

    host: str = "127.0.0.1"
    port: int = 5060
    realm: str = "callvault"
    nonce_secret: str = ""
    max_expires: int = 3600
    min_expires: int = 60
    no_answer_timeout: float = 30.0
    session_expires: int = 1800
    resource_manager: str = "127.0.0.1:5070"
    #: Several RMs (active/active, docs/HA.md): new recording bridges go to them in turn, and to
    #: the next one when one does not answer or answers 503. Empty: ``resource_manager`` alone.
    resource_managers: list[str] = field(default_factory=list)
    #: RFC 4028 Min-SE: the shortest session interval accepted (422 below it).
    min_se: int = 90
    #: How long to wait for the RM/MCP to answer a recording-bridge INVITE before the call goes on
    #: unrecorded.
    recording_timeout: float = 5.0
    #: Graceful shutdown: how long established calls may go on before they are ended by BYE.
    shutdown_timeout: float = 10.0
    #: Digest algorithms challenged with, most preferred first (RFC 8760 2.4: clients answer the
    #: first one they support). The default is MD5 alone because the lab's reference peers cannot
    #: cope with a SHA-256 challenge: SIPp 3.6.1 answers only the first challenge and knows only
    #: MD5, and baresip 1.0.0 (libre) refuses a 401 that carries any algorithm it does not know.
    #: ["SHA-256", "MD5"] offers both, SHA-256 preferred, for phones that implement RFC 8760.
    digest_algorithms: list[str] = field(default_factory=lambda: ["MD5"])
    # -- active / hot standby (docs/HA.md). replication_port 0: a lone server, no replication.
    #: "primary" (preferred active), "standby" (preferred standby) or "auto" (between the two).
    role: str = "primary"
    #: This node's name in the pair (logs, and the last tie-break); default replication host:port.
    node_name: str = ""
    #: Where this node listens for its peer's replication connection (TCP).
    replication_host: str = "127.0.0.1"
    replication_port: int = 0
    #: The peer's replication address, host:port.
    peer: str = ""
    #: Shared secret of the pair (HMAC challenge on the replication link); empty: nonce_secret.
    replication_secret: str = ""
    #: Heartbeats both ways every interval; the peer is dead after ``heartbeat_misses`` missed
    #: ones with its replication connection gone.
    heartbeat_interval: float = 0.2
    heartbeat_misses: int = 3
    #: Run (shell) before taking over the service address, e.g. ``ip addr add VIP/32 dev eth0``
    #: (what keepalived would do); ``release_command`` when an active yields to its peer.
    takeover_command: str = ""
    release_command: str = ""
    #: Seconds a node taking over keeps retrying to bind the SIP address (freed by the dead peer).
    bind_timeout: float = 5.0

    def validate(self, where: str) -> None:
        if self.role not in ("primary", "standby", "auto"):
            raise ConfigError(f"{where}.role must be 'primary', 'standby' or 'auto', not {self.role!r}")
        if not 0 <= self.replication_port < 65536:
            raise ConfigError(f"{where}.replication_port is out of range")
        if self.replication_port:
            _parse_hostport(self.peer, f"{where}.peer")
        if self.heartbeat_interval <= 0 or self.heartbeat_misses < 1:
            raise ConfigError(f"{where}.heartbeat_interval must be positive and heartbeat_misses at least 1")
        if self.bind_timeout <= 0:
            raise ConfigError(f"{where}.bind_timeout must be positive")


#: Shortest accepted ``resource_manager.replication_secret``.
MIN_REPLICATION_SECRET = 16


@dataclass
class RmInstance:
    """One RM of an active/active group: its SIP address and its affinity replication port."""

    name: str = "rm1"
    host: str = "127.0.0.1"
    port: int = 5070
    replication_port: int = 5071


@dataclass
class ResourceManagerConfig:
    """The Resource Manager: stateful proxy in front of the MCPs.

    With ``instances`` (two or more), ``callvault resource-manager --name NAME`` runs the named one
    on its own host/port, replicating the session affinity to the others (docs/HA.md); the other
    settings here are shared by all of them.
    """

    host: str = "127.0.0.1"
    port: int = 5070
    options_interval: float = 1.0
    failures_before_down: int = 3
    # Seconds to wait for any answer (even 100 Trying) from an MCP before trying the next one.
    failover_timeout: float = 2.0
    # Idle seconds after which a recording session's affinity is forgotten (longer than any
    # session-timer refresh interval: every in-dialog request renews it).
    affinity_ttl: float = 7200.0
    # Retry-After (seconds) on the 503 answered when no MCP is healthy.
    retry_after: int = 5
    # Seconds a stopping RM waits for transactions in flight.
    shutdown_timeout: float = 5.0
    instances: list[RmInstance] = field(default_factory=list)
    # Seconds a starting RM waits for its peers' affinity snapshots before it reports ready.
    sync_timeout: float = 3.0
    #: Shared secret of the instances (HMAC challenge and per-message MACs on the affinity
    #: replication links, services/ha_auth.py); required with two or more instances.
    replication_secret: str = ""

    def instance(self, name: str | None) -> RmInstance | None:
        """The named instance (the first one for None); None when no instances are configured."""
        if not self.instances:
            return None
        if name is None:
            return self.instances[0]
        for inst in self.instances:
            if inst.name == name:
                return inst
        known = ", ".join(i.name for i in self.instances)
        raise ConfigError(f"resource_manager.instances: no RM named {name!r} (known: {known})")

    def validate(self, where: str) -> None:
        names: set[str] = set()
        for i, inst in enumerate(self.instances):
            if inst.name in names:
                raise ConfigError(f"{where}.instances[{i}].name {inst.name!r} is used twice")
            names.add(inst.name)
            if not 0 < inst.replication_port < 65536:
                raise ConfigError(f"{where}.instances[{i}].replication_port is out of range")
        if len(self.instances) > 1 and len(self.replication_secret) < MIN_REPLICATION_SECRET:
            what = "is not set" if not self.replication_secret else "is too short"
            raise ConfigError(
                f"{where}.replication_secret {what}: the {len(self.instances)} instances replicate the "
                f"session affinity over a link authenticated by it (at least {MIN_REPLICATION_SECRET} "
                f"characters, the same on every instance; e.g. CALLVAULT_RESOURCE_MANAGER_REPLICATION_SECRET)"
            )
        if self.sync_timeout < 0:
            raise ConfigError(f"{where}.sync_timeout must not be negative")
        if self.options_interval <= 0:
            raise ConfigError(f"{where}.options_interval must be positive")
        if self.failures_before_down < 1:
            raise ConfigError(f"{where}.failures_before_down must be at least 1")
        if self.failover_timeout <= 0:
            raise ConfigError(f"{where}.failover_timeout must be positive")
        if self.affinity_ttl < 60:
            raise ConfigError(f"{where}.affinity_ttl must be at least 60 seconds")


@dataclass
class McpConfig:
    """One MCP media node."""

    name: str = "mcp1"
    host: str = "127.0.0.1"
    port: int = 5080
    rtp_ip: str = "127.0.0.1"
    rtp_port_min: int = 20000
    rtp_port_max: int = 24999
    spool_dir: str = "var/mcp1/spool"
    engine_threads: int = 1
    #: rtp_core's receive path: "auto" (the packet ring where CAP_NET_RAW allows, else io_uring
    #: where the kernel allows, else epoll), or one of "packet", "io_uring", "epoll" (docs/RTP_CORE.md).
    engine_io: str = "auto"
    media_timeout: float = 60.0
    # Seconds a stopping MCP spends ending its sessions (BYE) and storing their recordings.
    shutdown_timeout: float = 10.0

    def validate(self, where: str) -> None:
        if not (1024 <= self.rtp_port_min < self.rtp_port_max <= 65535):
            raise ConfigError(f"{where}.rtp_port_min/rtp_port_max must be a range within 1024-65535")
        if self.rtp_port_max - self.rtp_port_min < 8:
            raise ConfigError(f"{where}: the RTP port range must hold at least 8 ports")
        if self.engine_io not in ("auto", "packet", "io_uring", "epoll"):
            raise ConfigError(
                f"{where}.engine_io must be one of auto, packet, io_uring, epoll, not {self.engine_io!r}"
            )
        if not 1 <= self.engine_threads <= 64:
            raise ConfigError(f"{where}.engine_threads must be within 1-64")
        if (self.rtp_port_max - self.rtp_port_min + 1) // 2 < 4 * self.engine_threads:
            raise ConfigError(
                f"{where}: the RTP port range is too small for {self.engine_threads} engine threads"
            )


@dataclass
class StorageConfig:
    """Where finished recordings and their events go."""

    disk_root: str = "var/storage"
    queue_dir: str = "var/queue"
    # S3-compatible object storage, for tenants whose IVR Profile says storage = "s3" (path-style
    # addressing; services/storage/s3.py). Objects are keyed like disk files: <tenant>/<YYYY>/<MM>/<DD>/<id>.<ext>.
    s3_endpoint_url: str = ""
    s3_bucket: str = ""
    s3_region: str = "us-east-1"
    s3_access_key: str = ""
    s3_secret_key: str = ""
    #: Files up to this size go in one PUT; larger ones as multipart uploads of parts this size.
    s3_part_size: int = 8 * 1024 * 1024
    #: Parts of one multipart upload in flight at once (each holds a part in memory while it is sent).
    s3_part_concurrency: int = 4
    #: Attempts per S3 request (exponential backoff between them) before the upload as a whole fails.
    s3_max_attempts: int = 5
    s3_timeout: float = 30.0
    #: A recording whose upload failed waits in the MCP's spool and is retried forever, the delay
    #: doubling from 0.5 s up to this many seconds.
    upload_max_backoff: float = 10.0

    def validate(self, where: str) -> None:
        if not 5 * 1024 * 1024 <= self.s3_part_size <= 5 * 1024**3:
            raise ConfigError(f"{where}.s3_part_size must be between 5 MiB and 5 GiB (S3's part limits)")
        if not 1 <= self.s3_part_concurrency <= 16:
            raise ConfigError(f"{where}.s3_part_concurrency must be within 1-16")
        if self.s3_max_attempts < 1:
            raise ConfigError(f"{where}.s3_max_attempts must be at least 1")
        if self.s3_timeout <= 0:
            raise ConfigError(f"{where}.s3_timeout must be positive")
        if self.upload_max_backoff < 0.5:
            raise ConfigError(f"{where}.upload_max_backoff must be at least 0.5 seconds")
        if self.s3_endpoint_url and not re.match(r"https?://[^/\s]+", self.s3_endpoint_url):
            raise ConfigError(f"{where}.s3_endpoint_url must be an http:// or https:// URL")

    @property
    def s3_configured(self) -> bool:
        return bool(self.s3_bucket)


@dataclass
class WebServicesConfig:
    """The REST API over the metadata store."""

    host: str = "127.0.0.1"
    port: int = 8080
    database: str = "var/metadata.sqlite3"
    internal_token: str = ""
    # HMAC key of signed playback URLs; shared by all instances (derived from internal_token if empty)
    url_signing_key: str = ""
    signed_url_ttl: float = 300.0
    #: Metadata store: "sqlite" (the file ``database``) or "cassandra" (the cassandra_* settings).
    backend: str = "sqlite"
    #: host or host:port (9042 by default); from the environment as a comma-separated list.
    cassandra_contact_points: list[str] = field(default_factory=list)
    cassandra_keyspace: str = "callvault"
    #: consistency of reads and writes; lightweight transactions use cassandra_serial_consistency
    cassandra_consistency: str = "LOCAL_QUORUM"
    cassandra_serial_consistency: str = "LOCAL_SERIAL"
    #: keyspace replication: "SimpleStrategy:3" or "NetworkTopologyStrategy:dc1=3,dc2=3"
    cassandra_replication: str = "SimpleStrategy:3"
    #: the local data centre of DCAwareRoundRobinPolicy (empty: the driver picks the first it sees)
    cassandra_local_dc: str = ""
    #: seconds between retention runs (tenants' ``retention`` rules; one instance at a time); 0 = off
    retention_interval: float = 3600.0

    def validate(self, where: str) -> None:
        if self.backend not in ("sqlite", "cassandra"):
            raise ConfigError(f"{where}.backend must be 'sqlite' or 'cassandra', not {self.backend!r}")
        if self.retention_interval < 0:
            raise ConfigError(f"{where}.retention_interval must not be negative")
        if self.backend != "cassandra":
            return
        from services.web_services import store_cassandra as sc

        if not self.cassandra_contact_points:
            raise ConfigError(
                f"{where}.cassandra_contact_points must not be empty when backend is 'cassandra'"
            )
        checks: list[tuple[str, Any]] = [
            ("cassandra_keyspace", lambda: sc.check_keyspace(self.cassandra_keyspace)),
            ("cassandra_replication", lambda: sc.parse_replication(self.cassandra_replication)),
        ]
        checks += [
            (f"cassandra_contact_points[{i}]", lambda c=c: sc.parse_contact_point(c))
            for i, c in enumerate(self.cassandra_contact_points)
        ]
        for name, check in checks:
            try:
                check()
            except ValueError as exc:
                raise ConfigError(f"{where}.{name}: {exc}") from None
        if self.cassandra_consistency not in sc.CONSISTENCY_LEVELS:
            raise ConfigError(
                f"{where}.cassandra_consistency must be one of {', '.join(sc.CONSISTENCY_LEVELS)},"
                f" not {self.cassandra_consistency!r}"
            )
        if self.cassandra_serial_consistency not in sc.SERIAL_CONSISTENCY_LEVELS:
            raise ConfigError(
                f"{where}.cassandra_serial_consistency must be SERIAL or LOCAL_SERIAL,"
                f" not {self.cassandra_serial_consistency!r}"
            )


@dataclass
class RecordingProcessorConfig:
    """Consumes the recording-event queue and posts metadata to Web Services."""

    web_services_url: str = "http://127.0.0.1:8080"
    #: further Web Services instances: when the current one is unreachable or answers 5xx the next
    #: one is tried at once (N+1 without a load balancer); events wait only while all are down
    web_services_urls: list[str] = field(default_factory=list)
    #: "active" processors all consume (active/active); a "backup" consumes only while no active
    #: processor of this host is alive (they hold <queue_dir>/.active.lock shared)
    role: str = "active"
    poll_interval: float = 0.2
    # a claimed event not acknowledged after this long (its processor died) goes back to the queue
    claim_timeout: float = 60.0
    # retry delay when Web Services is unreachable: poll_interval doubling up to max_backoff
    max_backoff: float = 5.0
    request_timeout: float = 10.0

    def validate(self, where: str) -> None:
        if self.role not in ("active", "backup"):
            raise ConfigError(f"{where}.role must be 'active' or 'backup', not {self.role!r}")
        for i, url in enumerate([self.web_services_url, *self.web_services_urls]):
            if not re.fullmatch(r"https?://[^/\s]+/?", url):
                name = "web_services_url" if i == 0 else f"web_services_urls[{i - 1}]"
                raise ConfigError(f"{where}.{name} must be http(s)://host:port, not {url!r}")

    def urls(self) -> list[str]:
        """The Web Services base URLs, in the order they are tried."""
        out: list[str] = []
        for url in (self.web_services_url, *self.web_services_urls):
            if url.rstrip("/") not in out:
                out.append(url.rstrip("/"))
        return out


@dataclass
class CryptoServerConfig:
    """The Crypto Server: tenants' private keys; unwraps recordings' data keys for Web Services.

    Several instances run active/active over one keystore directory; each binds ``host:port`` (the
    lab starts one per entry of ``urls`` with ``--set crypto_server.port=...``). Web Services asks
    the instances of ``urls`` in turn (services/web_services/crypto_client.py).
    """

    host: str = "127.0.0.1"
    port: int = 8090
    #: One directory per tenant, one PEM (private key + certificate) per key id, mode 0700/0600.
    keystore_dir: str = "var/keystore"
    #: Bearer token of ``POST /api/v1/unwrap`` (what Web Services presents); empty = unwrap disabled.
    internal_token: str = ""
    #: Bearer token of key management (``/api/v1/tenants/{t}/certificates``); empty = disabled.
    admin_token: str = ""
    #: Base URLs of the instances, tried in turn by Web Services; empty = ``http://host:port``.
    urls: list[str] = field(default_factory=list)
    #: Web Services: seconds to wait for one instance before trying the next.
    request_timeout: float = 3.0
    #: Web Services: seconds an unwrapped data key stays in memory for the recording's next range
    #: requests (a player seeks with many); 0 = ask the Crypto Server every time.
    key_cache_seconds: float = 60.0

    def validate(self, where: str) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError(f"{where}.port {self.port} is out of range")
        for i, url in enumerate(self.urls):
            if not re.fullmatch(r"https?://[^/\s]+/?", url):
                raise ConfigError(f"{where}.urls[{i}] must be http(s)://host:port, not {url!r}")
        if self.request_timeout <= 0:
            raise ConfigError(f"{where}.request_timeout must be positive")
        if self.key_cache_seconds < 0:
            raise ConfigError(f"{where}.key_cache_seconds must not be negative")

    def instance_urls(self) -> list[str]:
        """The base URLs Web Services tries, in order."""
        return [u.rstrip("/") for u in self.urls] or [f"http://{self.host}:{self.port}"]


@dataclass
class ClusterConfig:
    """The whole cluster: every daemon's section plus the tenants."""

    sip_server: SipServerConfig = field(default_factory=SipServerConfig)
    resource_manager: ResourceManagerConfig = field(default_factory=ResourceManagerConfig)
    mcp: list[McpConfig] = field(default_factory=list)
    storage: StorageConfig = field(default_factory=StorageConfig)
    web_services: WebServicesConfig = field(default_factory=WebServicesConfig)
    recording_processor: RecordingProcessorConfig = field(default_factory=RecordingProcessorConfig)
    crypto_server: CryptoServerConfig = field(default_factory=CryptoServerConfig)
    tenants: list[Tenant] = field(default_factory=list)
    base_dir: str = "."

    def validate(self) -> None:
        self.resource_manager.validate("resource_manager")
        self.sip_server.validate("sip_server")
        self.web_services.validate("web_services")
        self.recording_processor.validate("recording_processor")
        self.storage.validate("storage")
        self.crypto_server.validate("crypto_server")
        names: set[str] = set()
        for i, mcp in enumerate(self.mcp):
            mcp.validate(f"mcp[{i}]")
            if mcp.name in names:
                raise ConfigError(f"mcp[{i}].name {mcp.name!r} is used twice")
            names.add(mcp.name)
        ids: set[str] = set()
        domains: dict[str, str] = {}
        keys: set[str] = set()
        for i, tenant in enumerate(self.tenants):
            where = f"tenants[{i}]"
            tenant.validate(where)
            if tenant.profile.storage == "s3" and not self.storage.s3_configured:
                raise ConfigError(f"{where}.profile.storage is 's3' but storage.s3_bucket is not set")
            if tenant.id in ids:
                raise ConfigError(f"{where}.id {tenant.id!r} is used twice")
            ids.add(tenant.id)
            _check_certificates(self, tenant.profile, f"{where}.profile.certificates")
            if tenant.api_key in keys:
                raise ConfigError(f"{where}.api_key is shared with another tenant")
            keys.add(tenant.api_key)
            for domain in tenant.domains:
                if domain in domains:
                    raise ConfigError(
                        f"{where}.domains: {domain!r} already belongs to tenant {domains[domain]!r}"
                    )
                domains[domain] = tenant.id
        _parse_hostport(self.sip_server.resource_manager, "sip_server.resource_manager")
        for i, rm in enumerate(self.sip_server.resource_managers):
            _parse_hostport(rm, f"sip_server.resource_managers[{i}]")

    # Look-ups shared by the daemons.
    def tenant(self, tenant_id: str) -> Tenant | None:
        return next((t for t in self.tenants if t.id == tenant_id), None)

    def tenant_for_domain(self, domain: str) -> Tenant | None:
        """The tenant owning a SIP domain; the first tenant when no tenant lists it."""
        for t in self.tenants:
            if domain in t.domains:
                return t
        return self.tenants[0] if self.tenants else None

    def tenant_for_api_key(self, key: str) -> Tenant | None:
        import hmac

        found = None
        for t in self.tenants:
            if hmac.compare_digest(t.api_key.encode(), key.encode()):
                found = t
        return found

    def mcp_named(self, name: str) -> McpConfig:
        for m in self.mcp:
            if m.name == name:
                return m
        raise ConfigError(
            f"mcp: no MCP named {name!r} (known: {', '.join(m.name for m in self.mcp) or 'none'})"
        )

    def path(self, value: str) -> Path:
        """Resolve a path from the file relative to the config file's directory."""
        p = Path(value)
        return p if p.is_absolute() else Path(self.base_dir) / p


def _check_certificates(config: ClusterConfig, profile: IvrProfile, where: str) -> None:
    """Resolve an IVR Profile's certificate paths and check each one (parseable X.509 PEM, RSA key of
    at least 2048 bits, within its validity period)."""
    if not profile.certificates:
        return
    from services.storage.envelope import CertificateError, load_certificate

    resolved = []
    for i, value in enumerate(profile.certificates):
        path = config.path(value)
        try:
            load_certificate(path)
        except CertificateError as exc:
            raise ConfigError(f"{where}[{i}]: {exc}") from None
        resolved.append(str(path.resolve()))
    profile.certificates = resolved


def parse_hostport(value: str, where: str = "address") -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` for IPv6); raise ConfigError naming ``where``."""
    return _parse_hostport(value, where)


def _parse_hostport(value: str, where: str) -> tuple[str, int]:
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\[\]]+):(\d+)", value or "")
    if not m:
        raise ConfigError(f"{where} must be host:port, not {value!r}")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 0 < port < 65536:
        raise ConfigError(f"{where}: port {port} is out of range")
    return host, port


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Convert a TOML/env value to the annotated type, or raise ConfigError naming ``where``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(value, args[0], where)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str) and item_tp is str:
            value = [v.strip() for v in value.split(",") if v.strip()]  # from the environment / --set
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list")
        return [_convert(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a table")
        return _build(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{where} must be true or false, not {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where} must be an integer, not {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be an integer, not {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where} must be a number, not {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be a number, not {value!r}") from None
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where} must be a string, not {value!r}")
        return str(value)
    raise ConfigError(f"{where}: unsupported type {tp!r}")


def _build(cls: Any, data: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"{prefix}{unknown[0]} is not a known setting")
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _convert(data[f.name], hints[f.name], f"{where}.{f.name}" if where else f.name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}.{f.name} is required" if where else f"{f.name} is required")
    return cls(**kwargs)


def _apply_override(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {part} is not a table")
    node[parts[-1]] = value


_SECTIONS = (
    "sip_server",
    "resource_manager",
    "storage",
    "web_services",
    "recording_processor",
    "crypto_server",
)


def from_dict(
    data: dict[str, Any],
    *,
    base_dir: str = ".",
    overrides: dict[str, str] | None = None,
    environ: typing.Mapping[str, str] | None = None,
) -> ClusterConfig:
    """Build and validate a ClusterConfig from parsed TOML data plus env and CLI overrides."""
    data = dict(data)
    env = os.environ if environ is None else environ
    for section in _SECTIONS:
        cls = typing.get_type_hints(ClusterConfig)[section]
        for f in dataclasses.fields(cls):
            name = f"{ENV_PREFIX}{section}_{f.name}".upper()
            if name in env:
                _apply_override(data, f"{section}.{f.name}", env[name])
    for dotted, value in (overrides or {}).items():
        if dotted.split(".")[0] not in _SECTIONS:
            raise ConfigError(f"--set {dotted}: only {', '.join(_SECTIONS)} can be overridden")
        _apply_override(data, dotted, value)
    data.pop("base_dir", None)
    config: ClusterConfig = _build(ClusterConfig, data, "")
    config.base_dir = base_dir
    config.validate()
    return config


def load(
    path: str | os.PathLike[str],
    *,
    overrides: dict[str, str] | None = None,
    environ: typing.Mapping[str, str] | None = None,
) -> ClusterConfig:
    """Load, override and validate the cluster configuration file at ``path``."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"configuration file {p} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    return from_dict(data, base_dir=str(p.resolve().parent), overrides=overrides, environ=environ)
