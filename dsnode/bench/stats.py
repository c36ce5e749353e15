"""Latency histograms, per-process results, merging and report rendering."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram

from dsnode.bench.cpu import Capacity
from dsnode.bench.routing import RouteCounts, render_routing
from dsnode.bench.txns import render_bank

#: Histogram range in microseconds: 1 us .. 60 s, 3 significant digits.
HIST_LOWEST_US = 1
HIST_HIGHEST_US = 60_000_000
HIST_SIGFIGS = 3

#: Operations the bench knows, in report order.
OPS: tuple[str, ...] = ("put", "get", "txn")

PERCENTILES: tuple[tuple[str, float], ...] = (
    ("p50", 50.0),
    ("p90", 90.0),
    ("p99", 99.0),
    ("p99_9", 99.9),
)


def new_histogram() -> HdrHistogram:
    """An empty latency histogram (microseconds)."""
    return HdrHistogram(HIST_LOWEST_US, HIST_HIGHEST_US, HIST_SIGFIGS)


def decode_histogram(encoded: str | bytes) -> HdrHistogram:
    """Inverse of ``HdrHistogram.encode()``, as an independent histogram."""
    h = new_histogram()
    if encoded:
        h.decode_and_add(encoded)
    return h


def latency_summary(h: HdrHistogram) -> dict[str, float | int | None]:
    """min/mean/p50/p90/p99/p99.9/max in microseconds (``None`` when empty)."""
    if h.get_total_count() == 0:
        keys = ["min", "mean", *[k for k, _ in PERCENTILES], "max"]
        return dict.fromkeys(keys)
    out: dict[str, float | int | None] = {
        "min": h.get_min_value(),
        "mean": round(h.get_mean_value(), 1),
    }
    for name, p in PERCENTILES:
        out[name] = h.get_value_at_percentile(p)
    out["max"] = h.get_max_value()
    return out


@dataclass
class ProcessResult:
    """What one load-generator process measured (picklable; histograms encoded)."""

    window_s: float
    ok: dict[str, int]
    errors: dict[str, dict[str, int]]
    histograms: dict[str, str]
    incomplete: int = 0
    connect_errors: int = 0
    last_connect_error: str | None = None
    server_info: dict[str, Any] = field(default_factory=dict)
    interrupted: bool = False
    written: bytes | None = None
    """With ``--cleanup``: byte i is 1 when key i of the keyspace was written (or may have
    been: a put whose answer never came counts)."""
    acked_all: dict[str, int] = field(default_factory=dict)
    """Acknowledged requests per op over the whole run (warmup and drain included)."""
    route_counts: dict[str, int] = field(default_factory=dict)
    """:class:`~dsnode.bench.routing.RouteCounts` as a dict (answers in the window)."""


@dataclass
class OpReport:
    """Merged numbers for one operation (or for all of them)."""

    ok: int
    errors: Counter[str]
    histogram: HdrHistogram
    throughput: float
    requests_per_s: float

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "errors": sum(self.errors.values()),
            "errors_by_code": dict(sorted(self.errors.items())),
            "throughput": round(self.throughput, 1),
            "requests_per_s": round(self.requests_per_s, 1),
            "latency_us": latency_summary(self.histogram),
        }


@dataclass
class BenchReport:
    """The merged outcome of a bench run."""

    config: dict[str, Any]
    duration_s: float
    overall: OpReport
    per_op: dict[str, OpReport]
    incomplete: int
    connect_errors: int
    last_connect_error: str | None
    server_info: dict[str, Any]
    interrupted: bool
    processes: int
    cleanup: dict[str, Any] | None = None
    """With ``--cleanup``: ``{"deleted", "errors"}`` of the delete pass after the run."""
    acked_all: dict[str, int] = field(default_factory=dict)
    route_counts: RouteCounts = field(default_factory=RouteCounts)
    routing: dict[str, Any] | None = None
    """dsnode: the route used and the forwarded share (:func:`route_summary`)."""
    capacity: Capacity | None = None
    """dsnode with ``cpu``: CPU per node and the capacity-per-core figure."""
    bank: dict[str, Any] | None = None
    """dsnode with ``--hot-keys``: goodput and conflict rate (:func:`bank_summary`)."""

    @classmethod
    def merge(
        cls, config: dict[str, Any], ops: list[str], results: list[ProcessResult]
    ) -> BenchReport:
        """Combine per-process results; rates are summed (processes run concurrently)."""
        per_op: dict[str, OpReport] = {}
        all_hist = new_histogram()
        all_err: Counter[str] = Counter()
        all_ok = 0
        all_rate = 0.0
        all_req_rate = 0.0
        for op in ops:
            h = new_histogram()
            errors: Counter[str] = Counter()
            ok = 0
            rate = 0.0
            req_rate = 0.0
            for r in results:
                enc = r.histograms.get(op)
                if enc:
                    h.decode_and_add(enc)
                n_ok = r.ok.get(op, 0)
                n_err = sum(r.errors.get(op, {}).values())
                errors.update(r.errors.get(op, {}))
                ok += n_ok
                if r.window_s > 0:
                    rate += n_ok / r.window_s
                    req_rate += (n_ok + n_err) / r.window_s
            per_op[op] = OpReport(ok, errors, h, rate, req_rate)
            if h.get_total_count():
                all_hist.add(h)
            all_err.update(errors)
            all_ok += ok
            all_rate += rate
            all_req_rate += req_rate
        info: dict[str, Any] = {}
        acked_all: Counter[str] = Counter()
        counts = RouteCounts()
        for r in results:
            info = info or r.server_info
            acked_all.update(r.acked_all)
            for k, v in r.route_counts.items():
                setattr(counts, k, getattr(counts, k) + v)
        last_err = next((r.last_connect_error for r in results if r.last_connect_error), None)
        return cls(
            config=config,
            duration_s=max((r.window_s for r in results), default=0.0),
            overall=OpReport(all_ok, all_err, all_hist, all_rate, all_req_rate),
            per_op=per_op,
            incomplete=sum(r.incomplete for r in results),
            connect_errors=sum(r.connect_errors for r in results),
            last_connect_error=last_err,
            server_info=info,
            interrupted=any(r.interrupted for r in results),
            processes=len(results),
            acked_all=dict(acked_all),
            route_counts=counts,
        )

    def to_json(self) -> dict[str, Any]:
        """The whole report as one JSON-ready object (latencies in microseconds)."""
        overall = self.overall.to_json()
        return {
            "target": self.config.get("target"),
            "endpoints": self.config.get("endpoints"),
            "config": self.config,
            "server": self.server_info,
            "duration_s": round(self.duration_s, 3),
            "requests": overall["ok"] + overall["errors"],
            **overall,
            "ops": {op: r.to_json() for op, r in self.per_op.items()},
            "incomplete": self.incomplete,
            "connect_errors": self.connect_errors,
            "last_connect_error": self.last_connect_error,
            "interrupted": self.interrupted,
            "cleanup": self.cleanup,
            "routing": self.routing,
            "capacity": None if self.capacity is None else self.capacity.to_json(),
            "acked_all": dict(self.acked_all),
            "bank": self.bank,
            "histograms": {op: _encode(r.histogram) for op, r in self.per_op.items() if r.ok},
        }

    def render_json(self) -> str:
        return json.dumps(self.to_json(), sort_keys=False)

    def render_text(self) -> str:
        """A human-readable table."""
        c = self.config
        mix = ",".join(f"{k}={v:g}" for k, v in c["mix"].items())
        lines = [
            f"dsnode bench: target={c['target']} endpoints={','.join(c['endpoints'])} "
            f"connections={c['connections']} inflight={c['inflight']} "
            f"processes={self.processes}",
            f"workload: mix {mix}, key {c['key_size']} B, value {c['value_size']} B, "
            f"keyspace {c['keyspace']}, consistency {c['consistency']}, seed {c['seed']}",
        ]
        if c.get("txn_partitions"):
            lines.append(f"txns: {c['txn_ops']} keys each, in exactly {c['txn_partitions']} "
                         "partition(s)")  # fmt: skip
        if self.server_info:
            lines.append(
                "server: " + ", ".join(f"{k}={v}" for k, v in sorted(self.server_info.items()))
            )
        lines.append(
            f"measured {self.duration_s:.2f} s (warmup {c['warmup_s']:g} s)"
            + ("  [interrupted]" if self.interrupted else "")
        )
        lines.append("")
        head = ("op", "ok", "ops/s", "p50", "p90", "p99", "p99.9", "max", "errors")
        rows = [head]
        for name, r in [*self.per_op.items(), ("all", self.overall)]:
            if name != "all" and r.ok == 0 and not r.errors:
                continue
            lat = latency_summary(r.histogram)
            rows.append(
                (
                    name,
                    str(r.ok),
                    f"{r.throughput:,.0f}",
                    *(_fmt_us(lat[k]) for k in ("p50", "p90", "p99", "p99_9", "max")),
                    str(sum(r.errors.values())),
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        for row in rows:
            lines.append(
                "  ".join(
                    cell.ljust(w) if i == 0 else cell.rjust(w)
                    for i, (cell, w) in enumerate(zip(row, widths, strict=True))
                )
            )
        if self.overall.errors:
            lines.append("")
            lines.append(
                "errors by code: "
                + ", ".join(f"{k}={v}" for k, v in sorted(self.overall.errors.items()))
            )
        if self.incomplete:
            lines.append(f"incomplete (no answer before the drain deadline): {self.incomplete}")
        if self.connect_errors:
            lines.append(
                f"failed connection attempts: {self.connect_errors} "
                f"(last: {self.last_connect_error})"
            )
        if self.routing is not None:
            lines.extend(render_routing(self.routing))
        if self.capacity is not None:
            lines.extend(self.capacity.render_text())
        if self.bank is not None:
            lines.extend(render_bank(self.bank))
        if self.cleanup is not None:
            lines.append(
                f"cleanup: deleted the {self.cleanup['deleted']} keys written under "
                f"{c.get('prefix')!r}" + (f" ({self.cleanup['errors']} delete batches failed)"
                                          if self.cleanup["errors"] else "")
            )
        return "\n".join(lines)


def _encode(h: HdrHistogram) -> str:
    enc = h.encode()
    return enc.decode("ascii") if isinstance(enc, bytes) else enc


def encode_histogram(h: HdrHistogram) -> str:
    """``HdrHistogram.encode()`` as text (base64 of the compressed V2 format)."""
    return _encode(h)


def _fmt_us(v: float | int | None) -> str:
    if v is None:
        return "-"
    if v < 1000:
        return f"{v:.0f}us"
    if v < 1_000_000:
        return f"{v / 1000:.2f}ms"
    return f"{v / 1_000_000:.2f}s"
