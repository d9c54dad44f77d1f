"""The real stack for system tests: every daemon as its own process on free loopback ports.

One lab serves the whole session (starting it takes about two seconds); tests tell their
recordings apart by call id or party. At the end every daemon must still be alive: a daemon that
died during the session fails the run, whatever the tests asserted.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.lab import Lab, LabPorts
from tests.helpers.sipp import Sipp, start_registered_uas


class LabApi:
    """A small client of the lab's Web Services API, authorised as one tenant."""

    def __init__(self, base_url: str, api_key: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key

    def request(
        self, path: str, *, method: str = "GET", headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        req = urllib.request.Request(self.base_url + path, method=method)
        req.add_header("Authorization", f"Bearer {self.api_key}")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers), err.read()

    def json(self, path: str) -> Any:
        status, _, body = self.request(path)
        assert status == 200, f"GET {path}: {status} {body[:300]!r}"
        return json.loads(body)

    def search(self, **filters: str) -> list[dict[str, Any]]:
        """Every recording matching the filters, following the pagination cursor."""
        items: list[dict[str, Any]] = []
        query = "&".join(f"{k}={urllib.request.quote(str(v))}" for k, v in filters.items())
        path = f"/recordings?limit=500&{query}"
        while True:
            page = self.json(path)
            items += page["items"]
            if not page.get("next"):
                return items
            path = f"/recordings?limit=500&{query}&cursor={urllib.request.quote(page['next'])}"

    async def wait_for(self, count: int, timeout: float = 30.0, **filters: str) -> list[dict[str, Any]]:
        """Poll the search until ``count`` recordings match (or fail after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while True:
            found = await asyncio.to_thread(self.search, **filters)
            if len(found) >= count or time.monotonic() > deadline:
                return found
            await asyncio.sleep(0.3)


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    var = tmp_path_factory.mktemp("lab")
    the_lab = Lab(var, ports=LabPorts.free(), fresh=True)
    the_lab.start()
    try:
        yield the_lab
        dead = {label: d.tail(30) for label, d in the_lab.daemons.items() if not d.alive()}
        assert not dead, f"daemons died during the tests: {dead}"
    finally:
        the_lab.stop()


@pytest.fixture(scope="session")
def lab_info(lab: Lab) -> dict[str, Any]:
    return lab.info()


@pytest.fixture(scope="session")
def api(lab_info: dict[str, Any]) -> LabApi:
    return LabApi(lab_info["api"]["base_url"], lab_info["api"]["api_key"])


@pytest.fixture(scope="session")
def sip_addr(lab_info: dict[str, Any]) -> str:
    return f"{lab_info['sip']['host']}:{lab_info['sip']['port']}"


@pytest.fixture
def users(lab_info: dict[str, Any]) -> dict[str, str]:
    """extension -> password of the default tenant."""
    return {u["extension"]: u["password"] for u in lab_info["users"]}


def lab_sip(lab: Lab) -> str:
    """The SIP Server's host:port of a lab."""
    return f"{lab.config.sip_server.host}:{lab.config.sip_server.port}"


def lab_passwords(lab: Lab) -> dict[str, str]:
    """extension -> password of a lab's default tenant."""
    return {u["extension"]: u["password"] for u in lab.info()["users"]}


def lab_api(lab: Lab) -> LabApi:
    """A Web Services client of a lab, as its default tenant."""
    info = lab.info()
    return LabApi(info["api"]["base_url"], info["api"]["api_key"])


async def echo_callee(lab: Lab, extension: str, workdir: Path) -> Sipp:
    """A SIPp UAS registered as ``extension`` that answers every call and echoes its RTP."""
    return await start_registered_uas(
        "uas_echo.xml", lab_sip(lab), extension, lab_passwords(lab)[extension], workdir=workdir,
        rtp_echo=True, trace_messages=False, limit=1000,
    )  # fmt: skip


def storage_file(lab: Lab, recording: dict[str, Any]) -> Path:
    return Path(lab.info()["storage"]) / recording["storage"]["key"]
