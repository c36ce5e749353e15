"""Capacity per core: the CPU the cluster's nodes spent on a bench run.

Before and after the run the bench reads ``status.cpu_seconds`` (user + system CPU of
the node process) of every member (the member list comes from the first endpoint's
``status``). From the two samples: CPU seconds per node, the busiest node's CPU
seconds per 1,000 acknowledged puts, and the puts/s that implies with one core per
node (``1000 / that``). A wall-clock throughput on a small shared machine says little
about a bigger cluster; this figure compares clusters of different sizes fairly.

:func:`capacity_figures` is the pure arithmetic; :func:`read_cpu` does the I/O.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dsnode.bench.routing import split_addr
from dsnode.bench.targets import DsnodeTarget, TargetError, TargetOptions


@dataclass
class CpuSample:
    """``cpu_seconds`` per node id, and why the others could not be read."""

    cpu: dict[str, float] = field(default_factory=dict)
    unreachable: dict[str, str] = field(default_factory=dict)
    members: dict[str, str] = field(default_factory=dict)  # node id -> addr


@dataclass(frozen=True)
class Capacity:
    """What a before/after pair of samples says (see :func:`capacity_figures`)."""

    cpu_s: dict[str, float | None]  # per node; None when not measurable
    acked_puts: int
    busiest: str | None = None
    cpu_s_per_1k_puts: float | None = None
    puts_per_s_per_core: float | None = None
    notes: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "cpu_s": {k: None if v is None else round(v, 3) for k, v in self.cpu_s.items()},
            "acked_puts": self.acked_puts,
            "busiest_node": self.busiest,
            "busiest_cpu_s_per_1k_puts": _round(self.cpu_s_per_1k_puts, 4),
            "projected_puts_per_s_per_core": _round(self.puts_per_s_per_core, 1),
            "notes": list(self.notes),
        }

    def render_text(self) -> list[str]:
        per = ", ".join(
            f"{k} {'?' if v is None else f'{v:.2f}'}" for k, v in sorted(self.cpu_s.items())
        )
        lines = [f"cpu seconds per node: {per or '-'}"]
        if self.cpu_s_per_1k_puts is not None and self.puts_per_s_per_core is not None:
            lines.append(
                f"busiest node {self.busiest}: {self.cpu_s_per_1k_puts:.3f} cpu s per 1,000 "
                f"acked puts ({self.acked_puts:,} puts) -> {self.puts_per_s_per_core:,.0f} "
                "puts/s with one core per node"
            )
        lines.extend(f"cpu: {n}" for n in self.notes)
        return lines


def _round(v: float | None, digits: int) -> float | None:
    return None if v is None else round(v, digits)


def capacity_figures(
    before: CpuSample, after: CpuSample, acked_puts: int, other_acked: int = 0
) -> Capacity:
    """CPU used per node between two samples and the busiest node's cost per 1,000 puts.

    ``other_acked`` counts the gets and txns of a mixed load: their CPU is in the
    samples too, which a note says.

    A node missing from either sample (unreachable), or whose counter went backwards
    (it restarted), gets ``None`` and a note; then the busiest-node figure is skipped,
    since the node we could not measure may have been the busiest.
    """
    nodes = sorted(set(before.members) | set(after.members) | set(before.cpu) | set(after.cpu))
    notes: list[str] = []
    cpu_s: dict[str, float | None] = {}
    for nid in nodes:
        b, a = before.cpu.get(nid), after.cpu.get(nid)
        if b is None or a is None:
            why = before.unreachable.get(nid) or after.unreachable.get(nid) or "no sample"
            when = "before" if b is None else "after"
            notes.append(f"node {nid} could not be read {when} the run ({why})")
            cpu_s[nid] = None
        elif a < b:
            notes.append(f"node {nid}: cpu_seconds went backwards ({b} -> {a}); restarted?")
            cpu_s[nid] = None
        else:
            cpu_s[nid] = a - b
    if not nodes:
        notes.append("no cluster members known")
    if other_acked:
        notes.append(
            f"the CPU also covers {other_acked:,} acked gets/txns: the figure is per put, "
            "not for puts alone (use --mix put=1)"
        )
    measured = {k: v for k, v in cpu_s.items() if v is not None}
    if len(measured) < len(cpu_s) or not measured:
        notes.append("busiest-node figure skipped: not every node was measured")
        return Capacity(cpu_s, acked_puts, notes=tuple(notes))
    busiest = max(measured, key=lambda k: (measured[k], k))
    used = measured[busiest]
    if acked_puts <= 0:
        notes.append("busiest-node figure skipped: no puts were acknowledged")
        return Capacity(cpu_s, acked_puts, busiest=busiest, notes=tuple(notes))
    if used <= 0:
        notes.append("busiest-node figure skipped: no CPU time was measured")
        return Capacity(cpu_s, acked_puts, busiest=busiest, notes=tuple(notes))
    per_1k = used * 1000.0 / acked_puts
    return Capacity(
        cpu_s,
        acked_puts,
        busiest=busiest,
        cpu_s_per_1k_puts=per_1k,
        puts_per_s_per_core=1000.0 / per_1k,
        notes=tuple(notes),
    )


# --------------------------------------------------------------------------- I/O


async def _status(host: str, port: int, options: TargetOptions) -> dict[str, Any]:
    t = DsnodeTarget(host, port, options)
    try:
        await t.connect()
        async with asyncio.timeout(options.connect_timeout):
            reply = await t.request({"op": "status"})
    finally:
        t.close()
    if not reply.get("ok"):
        err = reply.get("error")
        code = err.get("code") if isinstance(err, dict) else None
        raise TargetError(str(code or "protocol_error"), "status failed")
    return reply


def _cpu_of(reply: dict[str, Any]) -> float:
    v = reply.get("cpu_seconds")
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
        raise TargetError("protocol_error", f"status has no usable cpu_seconds ({v!r})")
    return float(v)


def _why(exc: BaseException) -> str:
    if isinstance(exc, TargetError):
        return str(exc)
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}"


StatusFn = Callable[[str, int, TargetOptions], Any]


async def read_members(
    host: str, port: int, options: TargetOptions, status: StatusFn = _status
) -> dict[str, str]:
    """``{node_id: addr}`` from the ``members`` of one node's status."""
    reply = await status(host, port, options)
    members = reply.get("members")
    if not isinstance(members, list) or not members:
        raise TargetError("protocol_error", "status has no members list")
    out: dict[str, str] = {}
    for m in members:
        if isinstance(m, dict) and isinstance(m.get("node_id"), str) and isinstance(
            m.get("addr"), str
        ):
            out[m["node_id"]] = m["addr"]
    if not out:
        raise TargetError("protocol_error", "status members have no node_id/addr")
    return out


async def read_cpu(
    members: dict[str, str], options: TargetOptions, status: StatusFn = _status
) -> CpuSample:
    """Every member's ``cpu_seconds``, read concurrently; failures become notes."""

    async def one(addr: str) -> float:
        host, port = split_addr(addr)
        return _cpu_of(await status(host, port, options))

    ids = list(members)
    got = await asyncio.gather(*(one(members[i]) for i in ids), return_exceptions=True)
    sample = CpuSample(members=dict(members))
    for nid, res in zip(ids, got, strict=True):
        if isinstance(res, BaseException):
            if not isinstance(res, Exception):
                raise res
            sample.unreachable[nid] = f"{members[nid]}: {_why(res)}"
        else:
            sample.cpu[nid] = res
    return sample


async def sample_cluster(
    host: str,
    port: int,
    options: TargetOptions,
    members: dict[str, str] | None = None,
    status: StatusFn = _status,
) -> tuple[CpuSample | None, str | None]:
    """Read the member list (unless given) and every member's CPU.

    Returns ``(sample, None)``, or ``(None, reason)`` when even the member list
    cannot be had (the first endpoint does not answer ``status`` usefully).
    """
    if members is None:
        try:
            members = await read_members(host, port, options, status)
        except (OSError, TimeoutError, TargetError, ValueError) as exc:
            return None, f"cannot read the member list from {host}:{port} ({_why(exc)})"
    return await read_cpu(members, options, status), None
