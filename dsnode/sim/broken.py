"""Deliberately broken Paxos variants: the simulator must catch each of them
for some seed (tests/sim/test_sim_catches_bugs.py)."""

from __future__ import annotations

import dataclasses

from dsnode.core.effects import Reply
from dsnode.core.paxos.acceptor import Acceptor
from dsnode.core.paxos.group import PaxosGroup
from dsnode.core.paxos.messages import Ballot
from dsnode.core.paxos.statemachine import DedupKV


class ForgetfulAcceptor(Acceptor):
    """Never persists its promises, so a crash makes it forget them."""

    __slots__ = ()

    def _record_promise(self, ballot: Ballot, records: list[bytes]) -> None:
        return None


class NackFreeAcceptor(Acceptor):
    """Accepts any ballot in phase 2, ignoring its promise."""

    __slots__ = ()

    def on_accept(self, m, records, chosen_through=0):
        saved = self.promised
        self.promised = min(self.promised, m.ballot)
        try:
            return super().on_accept(m, records, chosen_through)
        finally:
            self.promised = max(saved, self.promised)


class UnboundedPromiseAcceptor(Acceptor):
    """Answers phase 1 the old way: every accepted value above its snapshot in
    one message, whatever the byte budget and whatever its log knows to be
    chosen. After a restart of every node such a promise outgrows the peer
    frame limit, the network drops it and no candidate ever wins: a liveness
    failure, not a safety one (see ``LIVENESS_BROKEN``)."""

    __slots__ = ()

    def on_prepare(self, m, records, chosen_through=0, budget=0):
        return super().on_prepare(dataclasses.replace(m, from_slot=0), records, 0, 1 << 62)


BROKEN = {"forgetful-acceptor": ForgetfulAcceptor, "nack-free-acceptor": NackFreeAcceptor}
# variants that break liveness (the simulator's leader-after-heal check catches them);
# the cores' own message bound is lifted for them, as if it did not exist
LIVENESS_BROKEN = {"unbounded-promises": UnboundedPromiseAcceptor}


class AnswersAnyValueGroup(PaxosGroup):
    """The old leader bug: answers the commands it batched into a slot with the
    results of whatever value was chosen there, even another leader's."""

    def _answer(self, p, slot, n, results, mine):
        for i, result in enumerate(results[:n]):
            token = p.tokens.pop((slot, i), None)
            if token is not None:
                self.out.reply.append(Reply(token, result=result))
        for i in range(len(results), n):
            p.tokens.pop((slot, i), None)
        return True


class LeaseIgnoresDriftGroup(PaxosGroup):
    """The naive lease: as long as the election timeout the followers honour,
    measured on the leader's own clock, as if all clocks ran at one rate and ticks
    had no granularity (``config.lease_ticks_for`` is the bound it ignores)."""

    def _lease_length(self) -> int:
        return self.cfg.election_timeout_ticks


class IdBlindKV(DedupKV):
    """Ignores request ids: a retried write whose first attempt was applied takes
    effect again."""

    __slots__ = ()

    def apply(self, rid, cmd, index):
        return super().apply(None, cmd, index)


class IdBlindGroup(PaxosGroup):
    sm_cls = IdBlindKV


BROKEN_GROUPS = {
    "answers-any-value": AnswersAnyValueGroup,
    "lease-ignores-drift": LeaseIgnoresDriftGroup,
    "id-blind-dedup": IdBlindGroup,
}

# variants of the world itself: "trusting-peers" admits a node whatever it lost
# (no identity gate), so a wiped or rolled-back acceptor votes again
WORLD_BROKEN = ("trusting-peers",)


def configure(cfg, name: str):
    """``cfg`` (a ``SimConfig``) running the broken variant ``name``."""
    if name in BROKEN:
        return dataclasses.replace(cfg, acceptor_cls=BROKEN[name])
    if name in BROKEN_GROUPS:
        return dataclasses.replace(cfg, group_cls=BROKEN_GROUPS[name])
    if name == "trusting-peers":
        return dataclasses.replace(
            cfg, identity_gate=False,
            faults=dataclasses.replace(cfg.faults, amnesia_weight=3),
        )
    frame = cfg.frame_bytes_max or cfg.paxos.peer_message_bytes_max
    return dataclasses.replace(
        cfg,
        acceptor_cls=LIVENESS_BROKEN[name],
        paxos=dataclasses.replace(cfg.paxos, peer_message_bytes_max=1 << 62),
        frame_bytes_max=frame,
        large_value_chance=max(cfg.large_value_chance, 0.5),
        faults=dataclasses.replace(cfg.faults, crash_all_weight=2),
    )
