"""``dsnode top``: a live view of every member of a cluster, refreshed every second.

It speaks the client protocol only (``status``), so it works against any node without the
admin listener: it asks the ``--endpoints`` for their status, learns the members (and their
addresses) from the answers, and asks every member it has not reached yet as well. Rates and
percentiles come from the counters each node carries in ``status`` (``metrics``): requests
answered and the bucket counts of request and fsync latency, differenced between two samples
``--interval`` apart. ``--once`` takes the two samples, prints one frame and exits (0 when at
least one node answered, 1 otherwise); ``--output json`` prints that frame as JSON.

Per member: the failure detector's state as the other members see it (the worst view), ready,
roles (L leader, F follower, C candidate, P pre-candidate: counts over the Paxos groups it
holds), partitions it leads, requests/s, p99 request latency, requests in flight, p99 fsync
latency, replication lag (slots between the highest commit index any member reports and what
this member has applied), and the largest event-loop lag since it started.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import click
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from dsnode.cli import CommandError, Settings, _common_options, _settings
from dsnode.client.client import Client, parse_endpoints
from dsnode.client.errors import DsnodeError
from dsnode.runtime.metrics import quantile

SEVERITY = {"alive": 0, "joining": 1, "leaving": 1, "suspect": 2, "left": 3, "dead": 4}
ROLE_LETTER = {"leader": "L", "follower": "F", "candidate": "C", "precandidate": "P"}


@dataclass
class Sample:
    """What one poll saw: node id -> its status (None: a known member that did not answer)."""

    at: float
    statuses: dict[str, dict | None]
    addrs: dict[str, str]


@dataclass
class Row:
    node: str
    addr: str
    reachable: bool
    state: str
    ready: bool | None
    roles: str
    leads: int | None
    requests_per_s: float | None
    p99_ms: float | None
    inflight: int | None
    fsync_p99_ms: float | None
    lag_slots: int | None
    loop_lag_max_ms: float | None
    peers_alive: str


# ---------------------------------------------------------------- polling
class Poller:
    """Keeps one client per node address and asks each for ``status``."""

    def __init__(self, settings: Settings, interval: float) -> None:
        self.settings = settings
        self.interval = interval
        self.seeds = [f"{h}:{p}" if ":" not in h else f"[{h}]:{p}"
                      for h, p in parse_endpoints(settings.endpoints)]
        self.clients: dict[str, Client] = {}
        self.addrs: dict[str, str] = {}  # node id -> address it was reached at / advertised

    def _client(self, addr: str) -> Client:
        c = self.clients.get(addr)
        if c is None:
            # a node that does not answer must not hold a frame up for long
            timeout = min(self.settings.timeout, max(2 * self.interval, 1.0))
            c = Client(addr, timeout=timeout, token=self.settings.token)
            self.clients[addr] = c
        return c

    async def _status(self, addr: str) -> dict | None:
        try:
            return await self._client(addr).status()
        except (DsnodeError, OSError):
            return None

    async def poll(self) -> Sample:
        statuses: dict[str, dict | None] = {}
        asked: set[str] = set()
        todo = list(dict.fromkeys([*self.seeds, *self.addrs.values()]))
        while todo:
            answers = await asyncio.gather(*(self._status(a) for a in todo))
            asked.update(todo)
            for addr, st in zip(todo, answers, strict=True):
                if st is None:
                    continue
                nid = str(st.get("node_id"))
                statuses[nid] = st
                self.addrs.setdefault(nid, addr)
            todo = []
            for st in list(statuses.values()):
                for m in st.get("members") or []:
                    nid, addr = str(m.get("node_id")), str(m.get("addr"))
                    if nid not in statuses and nid not in self.addrs:
                        self.addrs[nid] = addr
                    if nid not in statuses and self.addrs[nid] not in asked:
                        todo.append(self.addrs[nid])
            todo = list(dict.fromkeys(todo))
        for nid in self.addrs:
            statuses.setdefault(nid, None)
        return Sample(time.monotonic(), statuses, dict(self.addrs))

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.clients.values()))


# ---------------------------------------------------------------- computing a frame
def _counts(st: dict | None, name: str) -> tuple[list[float], list[int]] | None:
    try:
        h = st["metrics"][name]  # type: ignore[index]
        return [float(b) for b in h["le"]], [int(n) for n in h["counts"]]
    except (KeyError, TypeError, ValueError):
        return None


def _interval_p99_ms(prev: dict | None, cur: dict | None, name: str) -> float | None:
    now = _counts(cur, name)
    if now is None:
        return None
    bounds, counts = now
    before = _counts(prev, name)
    if before is not None and before[0] == bounds and len(before[1]) == len(counts):
        counts = [max(0, a - b) for a, b in zip(counts, before[1], strict=True)]
    else:
        return None
    q = quantile(bounds, counts, 0.99)
    return None if q is None else q * 1000


def _groups(st: dict) -> list[dict]:
    """The Paxos groups a status describes: ``paxos`` as one group, or a list of them."""
    px = st.get("paxos")
    if isinstance(px, list):
        return [g for g in px if isinstance(g, dict)]
    if isinstance(px, dict) and isinstance(px.get("groups"), list):
        return [g for g in px["groups"] if isinstance(g, dict)]
    return [px] if isinstance(px, dict) else []


def build_rows(prev: Sample | None, cur: Sample) -> list[Row]:
    """One row per member known in ``cur``; rates over ``prev`` -> ``cur`` when both exist."""
    dt = (cur.at - prev.at) if prev is not None else 0.0
    answered = {nid: st for nid, st in cur.statuses.items() if st is not None}
    top_commit = max((int(g.get("commit", 0)) for st in answered.values() for g in _groups(st)),
                     default=0)
    views: dict[str, list[str]] = {}
    for reporter, st in answered.items():
        for m in st.get("members") or []:
            nid = str(m.get("node_id"))
            if nid != reporter:
                views.setdefault(nid, []).append(str(m.get("state")))
    rows = []
    for nid in sorted(cur.statuses):
        st = cur.statuses[nid]
        seen = views.get(nid, [])
        state = max(seen, key=lambda s: SEVERITY.get(s, 5)) if seen else (
            "alive" if st is not None else "unreachable")
        addr = cur.addrs.get(nid, "?")
        if st is None:
            rows.append(Row(nid, addr, False, state, None, "-", None, None, None, None, None,
                            None, None, "-"))
            continue
        before = prev.statuses.get(nid) if prev is not None else None
        rate = None
        if before is not None and dt > 0:
            try:
                rate = max(0, st["metrics"]["requests"] - before["metrics"]["requests"]) / dt
            except (KeyError, TypeError):
                rate = None
        roles: dict[str, int] = {}
        groups = _groups(st)
        for g in groups:
            letter = ROLE_LETTER.get(str(g.get("role")), "?")
            roles[letter] = roles.get(letter, 0) + 1
        applied = min((int(g.get("applied", 0)) for g in groups), default=0)
        leads = sum(1 for p in st.get("partitions") or [] if p.get("leader") == nid)
        members = st.get("members") or []
        alive = sum(1 for m in members if m.get("state") == "alive")
        loop = st.get("event_loop") or {}
        rows.append(Row(
            node=nid,
            addr=addr,
            reachable=True,
            state=state,
            ready=bool(st.get("ready")),
            roles=" ".join(f"{k}{v}" for k, v in sorted(roles.items())) or "-",
            leads=leads,
            requests_per_s=rate,
            p99_ms=_interval_p99_ms(before, st, "request_latency"),
            inflight=st.get("inflight"),
            fsync_p99_ms=_interval_p99_ms(before, st, "fsync_latency"),
            lag_slots=max(0, top_commit - applied),
            loop_lag_max_ms=loop.get("lag_ms_max"),
            peers_alive=f"{alive}/{len(members)}",
        ))
    return rows


# ---------------------------------------------------------------- rendering
def _num(v: float | int | None, fmt: str = "{:.0f}") -> str:
    return "-" if v is None else fmt.format(v)


def render(rows: Iterable[Row], interval: float) -> Group:
    rows = list(rows)
    reachable = sum(r.reachable for r in rows)
    total = sum(r.requests_per_s or 0 for r in rows)
    head = Text(
        f"dsnode top  members {len(rows)}  reachable {reachable}  "
        f"requests/s {total:,.0f}  (every {interval:g}s; Ctrl-C quits)", style="bold")
    table = Table(box=None, pad_edge=False, header_style="bold")
    for name, justify in (
        ("NODE", "left"), ("ADDR", "left"), ("STATE", "left"), ("READY", "left"),
        ("ROLES", "left"), ("LEADS", "right"), ("REQ/S", "right"), ("P99 ms", "right"),
        ("INFLIGHT", "right"), ("FSYNC P99 ms", "right"), ("LAG", "right"),
        ("LOOP LAG ms", "right"), ("PEERS UP", "right"),
    ):
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for r in rows:
        style = None if r.reachable else "red"
        state_style = {"alive": "green", "suspect": "yellow"}.get(r.state, "red")
        table.add_row(
            r.node, r.addr, Text(r.state, style=state_style),
            "-" if r.ready is None else ("yes" if r.ready else Text("no", style="red")),
            r.roles, _num(r.leads), _num(r.requests_per_s, "{:,.0f}"),
            _num(r.p99_ms, "{:.2f}"), _num(r.inflight), _num(r.fsync_p99_ms, "{:.2f}"),
            _num(r.lag_slots), _num(r.loop_lag_max_ms, "{:.1f}"), r.peers_alive,
            style=style,
        )
    return Group(head, table)


def rows_json(rows: Iterable[Row], interval: float) -> dict[str, Any]:
    return {"interval_s": interval, "members": [asdict(r) for r in rows]}


# ---------------------------------------------------------------- the command
async def _once(settings: Settings, interval: float) -> list[Row]:
    poller = Poller(settings, interval)
    try:
        first = await poller.poll()
        await asyncio.sleep(interval)
        second = await poller.poll()
    finally:
        await poller.close()
    if not any(st is not None for st in second.statuses.values()):
        raise CommandError(f"no node answered at {settings.endpoints}", "unavailable")
    return build_rows(first, second)


async def _live(settings: Settings, interval: float, console: Console) -> None:
    poller = Poller(settings, interval)
    try:
        prev = await poller.poll()
        with Live(render(build_rows(None, prev), interval), console=console,
                  auto_refresh=False, screen=False) as live:
            while True:
                await asyncio.sleep(max(0.0, interval - (time.monotonic() - prev.at)))
                cur = await poller.poll()
                live.update(render(build_rows(prev, cur), interval), refresh=True)
                prev = cur
    finally:
        await poller.close()


@click.command("top")
@click.option("--once", is_flag=True, help="Print one frame (rates over --interval) and exit.")
@click.option("--interval", type=click.FloatRange(min=0.1, max=3600), default=1.0,
              show_default=True, help="Seconds between refreshes (and the --once sample).")
@_common_options(group_level=False)
def top_command(
    once: bool,
    interval: float,
    endpoints: str | None,
    timeout: float | None,
    token: str | None,
    output: str | None,
) -> None:
    """Live view of every member of the cluster: state, roles, requests/s, latency, lag.

    Reaches the --endpoints and then every member they list. --once prints a single frame
    (two samples --interval apart) for scripts; with --output json that frame is one JSON
    object {"interval_s", "members": [...]}. Exits 1 when no node answers.
    """
    s = _settings(endpoints, timeout, token, output)
    if once:
        rows = asyncio.run(_once(s, interval))
        if s.output == "json":
            click.echo(json.dumps(rows_json(rows, interval)))
        else:
            width = None if sys.stdout.isatty() else 200  # scripts get whole lines
            Console(width=width, soft_wrap=False).print(render(rows, interval))
        return
    if s.output == "json":
        raise click.UsageError("--output json needs --once")
    try:
        asyncio.run(_live(s, interval, Console()))
    except KeyboardInterrupt:
        pass
