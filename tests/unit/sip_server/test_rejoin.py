"""The MCP-failure re-join's bookkeeping (services/sip_server/rejoin.py), at its unit-test seam:
the re-join steps that talk to phones and MCPs are replaced, the control flow around them is real."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from services.sip_server.rejoin import RejoinMixin


class Harness(RejoinMixin):
    def __init__(self, outcome: Any) -> None:
        self.outcome = outcome
        self.discarded: list[Any] = []
        self.tasks: list[asyncio.Task[Any]] = []

    async def _open_part(self, call: Any) -> None:
        return None

    async def _rejoin_parties(self, call: Any, part: Any) -> bool:
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return bool(self.outcome)

    async def _discard_part(self, call: Any, part: Any) -> None:
        self.discarded.append(part)

    def _spawn(self, coro: Any, name: str) -> None:  # type: ignore[override]
        self.tasks.append(asyncio.ensure_future(coro))


class _State:
    id = "0123456789abcdef"


class _Call:
    state = _State()


async def test_a_failed_rejoin_reports_its_own_error_and_discards_the_new_part() -> None:
    h = Harness(RuntimeError("re-INVITE of B failed"))
    with pytest.raises(RuntimeError, match="re-INVITE of B failed"):
        await h._rejoin(_Call(), rerecord=True)  # type: ignore[arg-type]
    await asyncio.gather(*h.tasks)
    assert len(h.discarded) == 1


async def test_a_part_taken_over_is_kept_and_one_not_taken_is_discarded() -> None:
    kept = Harness(True)
    await kept._rejoin(_Call(), rerecord=True)  # type: ignore[arg-type]
    await asyncio.gather(*kept.tasks)
    assert kept.discarded == []
    dropped = Harness(False)
    await dropped._rejoin(_Call(), rerecord=True)  # type: ignore[arg-type]
    await asyncio.gather(*dropped.tasks)
    assert len(dropped.discarded) == 1
