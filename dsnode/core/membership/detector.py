"""The failure detector: how long a peer's silence must last before we call it
``suspect`` or ``dead``, adapted to how regularly we hear from it. Pure: the
shell tells it each tick a peer was heard from (any message, the node heartbeat
at least) and when this node's own event loop was stalled.

A phi-accrual detector (Hayashibara et al., 2004): for each peer it keeps the
intervals between arrivals (at most one arrival per tick is counted), and for a
silence of ``t`` ticks computes

    phi(t) = -log10(P[an interval > t])

under a normal distribution with the observed mean (plus
``acceptable_pause_ticks``: a pause of that much is normal) and standard
deviation (at least ``min_std_ticks``). ``phi`` grows with the silence, faster
for a peer that has always answered like clockwork. States:

- ``alive``: phi below ``suspect_phi``;
- ``suspect``: phi at or above it (LAN defaults: heartbeats every 50 ms, a
  1 s acceptable pause, threshold 8: suspect after about 1.3 s of silence);
- ``dead``: silent for ``dead_after_ticks`` or more, whatever phi says;
- ``suspect`` too for a peer never heard from.

A busy event loop on *this* node must not make every peer look silent: the
shell reports its own stalls (``stalled(ticks)``: the loop fell that many ticks
behind), and every peer's silence is credited with them.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

ALIVE, SUSPECT, DEAD = "alive", "suspect", "dead"


@dataclass(frozen=True, slots=True)
class DetectorConfig:
    suspect_phi: float = 8.0
    acceptable_pause_ticks: int = 100
    min_std_ticks: float = 5.0
    dead_after_ticks: int = 1000
    window: int = 200  # intervals kept per peer

    def __post_init__(self) -> None:
        if not self.suspect_phi > 0:
            raise ValueError("suspect_phi must be > 0")
        if self.acceptable_pause_ticks < 0 or self.min_std_ticks <= 0:
            raise ValueError("acceptable_pause_ticks must be >= 0 and min_std_ticks > 0")
        if self.dead_after_ticks < 1 or self.window < 2:
            raise ValueError("dead_after_ticks must be >= 1 and window >= 2")


class _Peer:
    __slots__ = ("last", "intervals", "total", "squares")

    def __init__(self, now: int, window: int) -> None:
        self.last = now
        self.intervals: deque[int] = deque(maxlen=window)
        self.total = 0  # sum of the intervals kept
        self.squares = 0  # and of their squares


class FailureDetector:
    def __init__(self, config: DetectorConfig | None = None) -> None:
        self.cfg = config or DetectorConfig()
        self._peers: dict[str, _Peer] = {}
        self.transitions = 0  # state changes seen by ``states`` (flapping shows here)
        self.suspicions = 0  # of them, from alive to suspect or dead
        self._seen: dict[str, str] = {}

    def heard(self, peer: str, now: int) -> None:
        """Something arrived from ``peer`` at tick ``now``."""
        p = self._peers.get(peer)
        if p is None:
            self._peers[peer] = _Peer(now, self.cfg.window)
            return
        gap = now - p.last
        if gap <= 0:
            return
        p.last = now
        iv = p.intervals
        if len(iv) == iv.maxlen:
            old = iv[0]
            p.total -= old
            p.squares -= old * old
        iv.append(gap)
        p.total += gap
        p.squares += gap * gap

    def stalled(self, ticks: int) -> None:
        """This node's loop fell ``ticks`` behind: nobody was silent for that long."""
        if ticks > 0:
            for p in self._peers.values():
                p.last += ticks

    def silence(self, peer: str, now: int) -> int | None:
        p = self._peers.get(peer)
        return None if p is None else max(0, now - p.last)

    def phi(self, peer: str, now: int) -> float:
        p = self._peers.get(peer)
        if p is None:
            return math.inf
        elapsed = max(0, now - p.last)
        n = len(p.intervals)
        mean = p.total / n if n else 1.0
        var = p.squares / n - mean * mean if n else 0.0
        std = max(math.sqrt(max(var, 0.0)), self.cfg.min_std_ticks)
        y = (elapsed - (mean + self.cfg.acceptable_pause_ticks)) / std
        if y <= -6.0:
            return 0.0  # well within the usual: P[interval > elapsed] is 1 to 9 digits
        # P[interval > elapsed] by the logistic approximation of the normal tail:
        # 1 / (1 + exp(y (1.5976 + 0.070566 y^2))), its log taken without overflow
        z = y * (1.5976 + 0.070566 * y * y)
        log_later = -(z + math.log1p(math.exp(-z))) if z > 0 else -math.log1p(math.exp(z))
        return -log_later / math.log(10)

    def state(self, peer: str, now: int) -> str:
        p = self._peers.get(peer)
        if p is None:
            return SUSPECT
        if now - p.last >= self.cfg.dead_after_ticks:
            return DEAD
        return SUSPECT if self.phi(peer, now) >= self.cfg.suspect_phi else ALIVE

    def states(self, peers: list[str], now: int) -> dict[str, str]:
        """Every peer's state now; counts changes since the last call (``transitions``)."""
        out = {peer: self.state(peer, now) for peer in peers}
        for peer, st in out.items():
            before = self._seen.get(peer)
            if before is not None and before != st:
                self.transitions += 1
                self.suspicions += before == ALIVE
            self._seen[peer] = st
        return out
