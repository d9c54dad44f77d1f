"""SIP transaction timers (RFC 3261 section 17 and table 4; RFC 6026 timers L and M).

Plain values and arithmetic only: the transaction layer asks for a duration and adds it to the
``now`` it was given; nothing here reads a clock.

Timers that only exist to cope with an unreliable transport (A, E, G) are disabled (``None``) on a
reliable one, and the "wait for retransmissions" timers (D, I, J, K) become zero (RFC 3261 17.1.1.2,
17.1.2.2, 17.2.1, 17.2.2).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = [
    "DEFAULT_TIMERS",
    "T1",
    "T2",
    "T4",
    "TIMER_A",
    "TIMER_B",
    "TIMER_C",
    "TIMER_D",
    "TIMER_E",
    "TIMER_F",
    "TIMER_G",
    "TIMER_H",
    "TIMER_I",
    "TIMER_J",
    "TIMER_K",
    "TIMER_L",
    "TIMER_M",
    "Timer",
    "TimerConfig",
    "is_reliable",
]

#: RTT estimate (RFC 3261 17.1.1.1).
T1 = 0.5
#: Maximum retransmit interval for non-INVITE requests and INVITE responses.
T2 = 4.0
#: Maximum duration a message will remain in the network.
T4 = 5.0

# RFC 3261 table 4, default values (the initial value for the doubling ones).
TIMER_A = T1  # INVITE request retransmit interval, UDP only; doubles each time
TIMER_B = 64 * T1  # INVITE transaction timeout
TIMER_C = 180.0  # proxy INVITE transaction timeout (> 3 min); used by proxies, not by this layer
TIMER_D = 32.0  # wait time for response retransmits: > 32 s for UDP, 0 for reliable
TIMER_E = T1  # non-INVITE request retransmit interval, UDP only; doubles up to T2
TIMER_F = 64 * T1  # non-INVITE transaction timeout
TIMER_G = T1  # INVITE response retransmit interval; doubles up to T2
TIMER_H = 64 * T1  # wait time for ACK receipt
TIMER_I = T4  # wait time for ACK retransmits: T4 for UDP, 0 for reliable
TIMER_J = 64 * T1  # wait time for non-INVITE request retransmits: 64*T1 for UDP, 0 for reliable
TIMER_K = T4  # wait time for response retransmits: T4 for UDP, 0 for reliable
TIMER_L = 64 * T1  # RFC 6026: wait time for accepted INVITE request retransmits (server)
TIMER_M = 64 * T1  # RFC 6026: wait time for retransmission of 2xx to INVITE (client)

_RELIABLE = frozenset({"tcp", "tls", "sctp", "ws", "wss"})


def is_reliable(transport: str) -> bool:
    """True for a reliable (connection-oriented) transport: TCP, TLS, SCTP, WebSocket."""
    return transport.lower() in _RELIABLE


class Timer(enum.Enum):
    """The transaction timers, named after RFC 3261 (A-K) and RFC 6026 (L, M).

    ``RETRANSMIT_2XX`` is the UAS core's 2xx-to-INVITE retransmission (RFC 3261 13.3.1.4, no letter
    in the RFC) and ``CANCEL`` the UAC's 64*T1 wait for a final response after sending CANCEL
    (RFC 3261 9.1).
    """

    A = "A"
    B = "B"
    D = "D"
    E = "E"
    F = "F"
    G = "G"
    H = "H"
    I = "I"  # noqa: E741 - the RFC's name
    J = "J"
    K = "K"
    L = "L"
    M = "M"
    RETRANSMIT_2XX = "2xx"
    CANCEL = "cancel"


@dataclass(frozen=True, slots=True)
class TimerConfig:
    """Timer base values; every timer is derived from these (RFC 3261 table 4).

    Tests and lab setups may shrink ``t1`` to make timeouts fast; the defaults are the RFC's.
    ``timer_d`` is independent of T1 in the RFC ("> 32 s"), so it has its own field.
    """

    t1: float = T1
    t2: float = T2
    t4: float = T4
    timer_d: float = TIMER_D

    def __post_init__(self) -> None:
        if not (0 < self.t1 <= self.t2):
            raise ValueError(f"timers: need 0 < t1 <= t2, got t1={self.t1} t2={self.t2}")
        if self.t4 < 0 or self.timer_d < 0:
            raise ValueError("timers: t4 and timer_d must not be negative")

    # -- client INVITE (17.1.1) -------------------------------------------------------------
    def a(self, transport: str) -> float | None:
        """Timer A, initial INVITE retransmit interval (T1), unreliable transports only."""
        return None if is_reliable(transport) else self.t1

    def b(self) -> float:
        """Timer B, INVITE transaction timeout (64*T1)."""
        return 64 * self.t1

    def d(self, transport: str) -> float:
        """Timer D, wait for response retransmissions (32 s on UDP, 0 on reliable)."""
        return 0.0 if is_reliable(transport) else self.timer_d

    def m(self) -> float:
        """Timer M (RFC 6026), wait for 2xx retransmissions in Accepted (64*T1)."""
        return 64 * self.t1

    # -- client non-INVITE (17.1.2) ---------------------------------------------------------
    def e(self, transport: str) -> float | None:
        """Timer E, initial non-INVITE retransmit interval (T1), unreliable transports only."""
        return None if is_reliable(transport) else self.t1

    def f(self) -> float:
        """Timer F, non-INVITE transaction timeout (64*T1)."""
        return 64 * self.t1

    def k(self, transport: str) -> float:
        """Timer K, wait for response retransmissions (T4 on UDP, 0 on reliable)."""
        return 0.0 if is_reliable(transport) else self.t4

    # -- server INVITE (17.2.1) -------------------------------------------------------------
    def g(self, transport: str) -> float | None:
        """Timer G, initial INVITE final-response retransmit interval (T1), unreliable only."""
        return None if is_reliable(transport) else self.t1

    def h(self) -> float:
        """Timer H, wait for the ACK of a non-2xx final response (64*T1)."""
        return 64 * self.t1

    def i(self, transport: str) -> float:
        """Timer I, wait for ACK retransmissions (T4 on UDP, 0 on reliable)."""
        return 0.0 if is_reliable(transport) else self.t4

    def l(self) -> float:  # noqa: E743 - the RFC's name
        """Timer L (RFC 6026), wait for INVITE retransmissions in Accepted (64*T1)."""
        return 64 * self.t1

    # -- server non-INVITE (17.2.2) ---------------------------------------------------------
    def j(self, transport: str) -> float:
        """Timer J, wait for request retransmissions (64*T1 on UDP, 0 on reliable)."""
        return 0.0 if is_reliable(transport) else 64 * self.t1

    # -- helpers ----------------------------------------------------------------------------
    def first_2xx_retransmit(self) -> float:
        """First interval of the UAS 2xx-to-INVITE retransmission (T1, RFC 3261 13.3.1.4)."""
        return self.t1

    def give_up_2xx(self) -> float:
        """How long the UAS retransmits a 2xx waiting for the ACK (64*T1, RFC 3261 13.3.1.4)."""
        return 64 * self.t1

    def cancel_wait(self) -> float:
        """How long a UAC waits for a final response after CANCEL (64*T1, RFC 3261 9.1)."""
        return 64 * self.t1

    def backoff(self, interval: float) -> float:
        """Next interval of a retransmit timer capped at T2 (timers E and G, 13.3.1.4)."""
        return min(2 * interval, self.t2)


#: The RFC's values.
DEFAULT_TIMERS = TimerConfig()
