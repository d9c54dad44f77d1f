"""The cluster configuration: loading, overrides and errors that name the field."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from services import config
from services.lab import LabPorts, make_config, to_toml

MINIMAL = """
[[mcp]]
name = "mcp1"

[[tenants]]
id = "default"
api_key = "0123456789abcdef"
domains = ["127.0.0.1"]

[[tenants.users]]
extension = "1001"
password = "secret"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_minimal_file_gets_defaults(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, MINIMAL), environ={})
    assert cfg.sip_server.port == 5060
    assert cfg.mcp[0].rtp_port_min == 20000
    assert cfg.tenants[0].user("1001").password == "secret"
    assert cfg.tenants[0].policy.should_record("1001", "1002")
    assert cfg.path("var/x") == tmp_path / "var/x"


def test_env_and_cli_overrides(tmp_path: Path) -> None:
    cfg = config.load(
        write(tmp_path, MINIMAL),
        overrides={"web_services.port": "8181"},
        environ={"CALLVAULT_SIP_SERVER_PORT": "5062", "CALLVAULT_RESOURCE_MANAGER_OPTIONS_INTERVAL": "0.5"},
    )
    assert cfg.sip_server.port == 5062
    assert cfg.web_services.port == 8181
    assert cfg.resource_manager.options_interval == 0.5


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ("[sip_server]\nprot = 1\n", "sip_server.prot is not a known setting"),
        ("[sip_server]\nport = 'x'\n", "sip_server.port must be an integer"),
        ("[sip_server]\nresource_manager = 'nohost'\n", "sip_server.resource_manager must be host:port"),
    ],
)
def test_errors_name_the_field(tmp_path: Path, patch: str, message: str) -> None:
    with pytest.raises(config.ConfigError, match=message):
        config.load(write(tmp_path, MINIMAL + patch), environ={})


def test_mcp_engine_settings(tmp_path: Path) -> None:
    cfg = config.load(
        write(tmp_path, MINIMAL.replace('name = "mcp1"', 'name = "mcp1"\nengine_io = "epoll"')), environ={}
    )
    assert cfg.mcp[0].engine_io == "epoll"
    assert config.load(write(tmp_path, MINIMAL), environ={}).mcp[0].engine_io == "auto"
    bad = [
        ('engine_io = "select"', r"mcp\[0\]\.engine_io must be one of"),
        ("engine_threads = 0", "engine_threads"),
    ]
    bad.append(
        ("rtp_port_min = 20000\nrtp_port_max = 20020\nengine_threads = 4", "too small for 4 engine threads")
    )
    for line, message in bad:
        with pytest.raises(config.ConfigError, match=message):
            config.load(
                write(tmp_path, MINIMAL.replace('name = "mcp1"', f'name = "mcp1"\n{line}')), environ={}
            )


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ('extension = "1001"', 'extension = "10 01"', r"tenants\[0\].users\[0\].extension"),
        ('api_key = "0123456789abcdef"', 'api_key = "short"', r"tenants\[0\].api_key"),
        ('id = "default"', 'id = "Bad Id"', r"tenants\[0\].id"),
    ],
)
def test_tenant_errors(tmp_path: Path, old: str, new: str, message: str) -> None:
    with pytest.raises(config.ConfigError, match=message):
        config.load(write(tmp_path, MINIMAL.replace(old, new)), environ={})


def test_policy_patterns() -> None:
    policy = config.RecordingPolicy(mode="pattern", patterns=["20[0-9]{2}"])
    assert policy.should_record("2001", "1002")
    assert policy.should_record("1001", "2002")
    assert not policy.should_record("1001", "1002")
    with pytest.raises(config.ConfigError, match="patterns\\[0\\]"):
        config.RecordingPolicy(mode="pattern", patterns=["("]).validate("policy")


def test_not_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="not valid TOML"):
        config.load(write(tmp_path, "[[["), environ={})
    with pytest.raises(config.ConfigError, match="does not exist"):
        config.load(tmp_path / "nope.toml", environ={})


def test_duplicate_domains_and_keys_rejected(tmp_path: Path) -> None:
    second = MINIMAL.split("[[tenants]]")[1].replace('id = "default"', 'id = "other"')
    with pytest.raises(config.ConfigError, match="api_key is shared"):
        config.load(write(tmp_path, MINIMAL + "[[tenants]]" + second), environ={})


def test_lab_config_round_trips_through_toml(tmp_path: Path) -> None:
    data = make_config(LabPorts.free())
    text = to_toml(data)
    assert tomllib.loads(text) == data
    cfg = config.load(write(tmp_path, text), environ={})
    assert [m.name for m in cfg.mcp] == ["mcp1", "mcp2"]
    assert cfg.tenant_for_domain("acme.lab").id == "acme"
    assert cfg.tenant_for_api_key(data["tenants"][1]["api_key"]).id == "acme"
    assert cfg.tenant_for_api_key("wrong") is None


RM_PAIR = """
[[resource_manager.instances]]
name = "rm1"
port = 5070
replication_port = 5071

[[resource_manager.instances]]
name = "rm2"
port = 5072
replication_port = 5073
"""


def test_rm_pair_needs_a_replication_secret(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + RM_PAIR)
    with pytest.raises(config.ConfigError, match=r"resource_manager\.replication_secret is not set"):
        config.load(path, environ={})
    with pytest.raises(config.ConfigError, match=r"resource_manager\.replication_secret is too short"):
        config.load(path, environ={}, overrides={"resource_manager.replication_secret": "short"})
    secret = "0123456789abcdef-pair"
    cfg = config.load(path, environ={"CALLVAULT_RESOURCE_MANAGER_REPLICATION_SECRET": secret})
    assert cfg.resource_manager.replication_secret == secret
    # a lone RM (no instances, or one) replicates nothing: no secret needed
    assert config.load(write(tmp_path, MINIMAL), environ={}).resource_manager.replication_secret == ""
    one = MINIMAL + RM_PAIR.split('[[resource_manager.instances]]\nname = "rm2"')[0]
    assert len(config.load(write(tmp_path, one), environ={}).resource_manager.instances) == 1


def test_lab_config_has_the_rm_secret_and_old_lab_files_get_one(tmp_path: Path) -> None:
    from services.lab import add_missing_secrets

    data = make_config(LabPorts.free())
    assert len(data["resource_manager"]["replication_secret"]) >= config.MIN_REPLICATION_SECRET
    del data["resource_manager"]["replication_secret"]  # a lab.toml written before it existed
    path = write(tmp_path, to_toml(data) + "# edited by hand\n")
    with pytest.raises(config.ConfigError, match="replication_secret"):
        config.load(path, environ={})
    assert add_missing_secrets(path)
    assert "# edited by hand" in path.read_text()
    secret = config.load(path, environ={}).resource_manager.replication_secret
    assert len(secret) >= config.MIN_REPLICATION_SECRET
    assert not add_missing_secrets(path)  # once
    assert config.load(path, environ={}).resource_manager.replication_secret == secret
