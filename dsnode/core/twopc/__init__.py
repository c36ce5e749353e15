"""Cross-partition transactions: two-phase commit whose every step is chosen by Paxos.

``records``: the commands (prepare, decide, resolve, forget) that go into the
partitions' logs; ``participant``: what a partition's state machine does with
them (locks, prepared transactions, decisions); ``coordinator``: one node's
driver of the transactions it was given; ``recovery``: what a partition's
leader does for transactions whose coordinator went away. All pure.
"""
