"""Stable hashes for the ring: the same bytes give the same number in every
process, on every platform and Python version (never the built-in ``hash()``,
which is salted per process for str and bytes)."""

from __future__ import annotations

from hashlib import blake2b

MASK64 = (1 << 64) - 1


def _h64(data: bytes, person: bytes) -> int:
    return int.from_bytes(blake2b(data, digest_size=8, person=person).digest(), "big")


def key_hash(key: bytes) -> int:
    """64-bit hash of a key: BLAKE2b-64, personalised so that it never equals
    the hashes below for the same bytes."""
    if not isinstance(key, bytes | bytearray | memoryview):
        raise TypeError(f"a key is bytes, got {type(key).__name__}")
    return _h64(bytes(key), b"dsnode-key")


def partition_of(key: bytes, partitions: int) -> int:
    """The partition of ``key`` among ``partitions``: key_hash mod P (P is
    fixed for the cluster's life, so plain modulo is stable)."""
    return key_hash(key) % partitions


def node_hash(node_id: str) -> int:
    return _h64(node_id.encode("utf-8"), b"dsnode-node")


def partition_hash(pid: int) -> int:
    return _h64(pid.to_bytes(4, "big"), b"dsnode-part")


def mix64(x: int) -> int:
    """SplitMix64's finaliser: a bijection on 64-bit integers that spreads
    every input bit over the output."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & MASK64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & MASK64
    return x ^ (x >> 31)


def affinity(pid_hash: int, node_hash_: int) -> int:
    """Rendezvous score of a (partition, node) pair, 53 bits: the higher, the
    more the partition wants the node. Independent across pairs in practice."""
    return mix64(pid_hash ^ node_hash_) >> 11


def affinity_row(pid_hash: int, node_hashes: list[int]) -> list[int]:
    """``affinity(pid_hash, h)`` for every ``h``, with the mixing inlined (the
    ring computes P x N of them)."""
    row = []
    for h in node_hashes:
        x = pid_hash ^ h
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & MASK64
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & MASK64
        row.append((x ^ (x >> 31)) >> 11)
    return row
