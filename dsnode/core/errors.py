"""Who is to blame (STYLE.md habit 5).

``InvariantBroken``: our own bug; the node must crash rather than go on with
corrupt state. ``PeerMisbehaved``: a stale or malformed message from a peer or
client; drop it, count it, log it once. ``StateLost``: the durable state a
node recovers from is incomplete (a snapshot the log depends on is missing or
corrupt); the node must not start on what is left.
"""


class InvariantBroken(AssertionError):
    pass


class PeerMisbehaved(Exception):
    pass


class StateLost(Exception):
    pass
