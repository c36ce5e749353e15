"""Who is to blame (STYLE.md habit 5).

``InvariantBroken``: our own bug; the node must crash rather than go on with
corrupt state. ``PeerMisbehaved``: a stale or malformed message from a peer or
client; drop it, count it, log it once.
"""


class InvariantBroken(AssertionError):
    pass


class PeerMisbehaved(Exception):
    pass
