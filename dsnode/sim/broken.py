"""Deliberately broken Paxos variants: the simulator must catch each of them
for some seed (tests/sim/test_sim_catches_bugs.py)."""

from __future__ import annotations

from dsnode.core.paxos.acceptor import Acceptor
from dsnode.core.paxos.messages import Ballot


class ForgetfulAcceptor(Acceptor):
    """Never persists its promises, so a crash makes it forget them."""

    __slots__ = ()

    def _record_promise(self, ballot: Ballot, records: list[bytes]) -> None:
        return None


class NackFreeAcceptor(Acceptor):
    """Accepts any ballot in phase 2, ignoring its promise."""

    __slots__ = ()

    def on_accept(self, m, records):
        saved = self.promised
        self.promised = min(self.promised, m.ballot)
        try:
            return super().on_accept(m, records)
        finally:
            self.promised = max(saved, self.promised)


BROKEN = {"forgetful-acceptor": ForgetfulAcceptor, "nack-free-acceptor": NackFreeAcceptor}
