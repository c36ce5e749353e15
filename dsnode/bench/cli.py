"""``dsnode bench``: a redis-benchmark / etcd-benchmark style load generator."""

from __future__ import annotations

import sys

import click

from dsnode.bench.routing import ROUTES
from dsnode.bench.runner import (
    CONSISTENCIES,
    BenchConfig,
    BenchError,
    Progress,
    parse_mix,
    print_report,
    run_bench,
)
from dsnode.bench.targets import target_names


def _positive_float(
    ctx: click.Context, param: click.Parameter, value: float | None
) -> float | None:
    if value is not None and value <= 0:
        raise click.BadParameter("must be > 0")
    return value


def _inherit_group_settings(
    ctx: click.Context, target: str, endpoints: str, token: str | None, output: str
) -> tuple[str, str | None, str]:
    """Take ``--endpoints``/``--token``/``--output`` given to the ``dsnode`` group.

    Only settings this command did not get itself, and (for endpoints and output) only
    those the user actually gave to the group; group endpoints from the environment
    (``DSNODE_ENDPOINTS``) apply to the dsnode target only.
    """
    parent = ctx.parent
    obj = ctx.find_object(object) if parent is not None else None
    if parent is None or obj is None:
        return endpoints, token, output
    default = click.core.ParameterSource.DEFAULT

    def given_here(name: str) -> bool:
        return ctx.get_parameter_source(name) not in (None, default)

    def parent_source(name: str) -> click.core.ParameterSource | None:
        return parent.get_parameter_source(name)

    group_eps = getattr(obj, "endpoints", None)
    src = parent_source("endpoints")
    if not given_here("endpoints") and isinstance(group_eps, str) and src not in (None, default):
        if target == "dsnode" or src == click.core.ParameterSource.COMMANDLINE:
            endpoints = group_eps
    group_token = getattr(obj, "token", None)
    if token is None and isinstance(group_token, str):
        token = group_token
    group_out = getattr(obj, "output", None)
    if not given_here("output") and group_out in ("text", "json"):
        if parent_source("output") not in (None, default):
            output = group_out
    return endpoints, token, output


@click.command("bench", context_settings={"show_default": True, "max_content_width": 100})
@click.option(
    "--target", type=click.Choice(target_names()), default="dsnode", help="System under test."
)
@click.option(
    "--endpoints",
    default="",
    help="Comma-separated host:port list; connections are spread round-robin. "
    "Default: the target's standard port on 127.0.0.1 (redis: 6379).",
)
@click.option(
    "--connections",
    type=click.IntRange(min=1),
    default=16,
    help="TCP connections (capped at --inflight).",
)
@click.option(
    "--inflight",
    type=click.IntRange(min=1),
    default=64,
    help="Total requests in flight, spread over the connections (each pipelines).",
)
@click.option("--key-size", type=click.IntRange(min=2), default=16, help="Key size in bytes.")
@click.option("--value-size", type=click.IntRange(min=0), default=100, help="Value size in bytes.")
@click.option(
    "--keyspace",
    type=click.IntRange(min=1),
    default=100_000,
    help="Number of distinct keys (chosen uniformly).",
)
@click.option(
    "--mix", "mix_text", default="put=1,get=0,txn=0", help="Relative weights of put/get/txn."
)
@click.option(
    "--duration",
    type=float,
    default=None,
    callback=_positive_float,
    help="Seconds to measure (default 10 unless --requests is given).",
)
@click.option(
    "--requests",
    type=click.IntRange(min=1),
    default=None,
    help="Measure exactly this many requests instead of a duration.",
)
@click.option(
    "--warmup",
    type=click.FloatRange(min=0),
    default=0.0,
    help="Seconds of unrecorded load before measuring.",
)
@click.option("--seed", type=int, default=1, help="Seed for keys and op choice.")
@click.option(
    "--consistency",
    type=click.Choice(CONSISTENCIES),
    default="linearizable",
    help="Consistency of gets (dsnode).",
)
@click.option(
    "--txn-ops",
    type=click.IntRange(min=1),
    default=2,
    help="Sub-ops per txn (alternating put, get on distinct keys); with --hot-keys, "
    "accounts per transfer.",
)
@click.option(
    "--txn-partitions",
    type=click.IntRange(min=0),
    default=0,
    help="dsnode: the --txn-ops keys of each txn fall in exactly this many distinct "
    "partitions (1: all in one; 2 or more: a cross-partition txn, two-phase commit), "
    "chosen with the partition map of the ring op; needs --txn-ops >= it. 0: keys "
    "drawn uniformly wherever they fall.",
)
@click.option(
    "--hot-keys",
    type=click.IntRange(min=0),
    default=0,
    help="dsnode: each txn is a bank transfer among this many hot accounts: linearizable "
    "gets of --txn-ops accounts, then a txn comparing their versions and putting the "
    "new balances. Reports goodput (committed transfers/s; latency is the whole "
    "transfer's) and conflict rate ((conflict answers + failed compares) / attempts). "
    "0: off.",
)
@click.option(
    "--token",
    default=None,
    envvar="DSNODE_TOKEN",
    show_default=False,
    help="Auth token (dsnode hello) or password (redis AUTH).",
)
@click.option(
    "--cacert",
    "cacert",
    default=None,
    envvar="DSNODE_CACERT",
    type=click.Path(dir_okay=False),
    help="CA certificate of a dsnode cluster with TLS on (env DSNODE_CACERT; or the group's "
    "--cacert).",
)
@click.option(
    "--processes",
    type=click.IntRange(min=1),
    default=1,
    help="Load-generator processes; histograms are merged.",
)
@click.option(
    "--connect-timeout",
    type=click.FloatRange(min=0.1),
    default=5.0,
    help="Seconds allowed for each connection attempt.",
)
@click.option(
    "--drain-timeout",
    type=click.FloatRange(min=0),
    default=5.0,
    help="Seconds to wait for outstanding requests at the end.",
)
@click.option(
    "--output",
    type=click.Choice(["text", "json"]),
    default="text",
    help="Report format (json: one object on stdout).",
)
@click.option(
    "--prefix",
    default="bench/",
    help="Every key the bench writes or reads starts with this, so it stays out of the "
    "rest of the keyspace (counts towards --key-size).",
)
@click.option(
    "--cleanup",
    is_flag=True,
    help="Afterwards, delete every key the run wrote (batched txns on one connection).",
)
@click.option(
    "--request-ids",
    is_flag=True,
    help="dsnode: give every put and txn a client_id and seq (request ids, as the Python "
    "client does), to measure what deduplication costs.",
)
@click.option(
    "--route",
    type=click.Choice(ROUTES),
    default="auto",
    help="dsnode: where requests go. ring: each to its partition's leader (map from the "
    "ring op, fetched again when answers say forwarded); one-node: all to the first "
    "endpoint; spread: connections round-robin over --endpoints; auto: ring when the "
    "server answers the ring op, else spread. ring on a server without the ring op "
    "runs as one-node.",
)
@click.option(
    "--cpu/--no-cpu",
    default=True,
    help="dsnode: read every member's cpu_seconds before and after the run and report "
    "the busiest node's CPU per 1,000 acked puts (capacity per core).",
)
@click.option(
    "--progress/--no-progress",
    default=None,
    show_default=False,
    help="Progress line on stderr [default: on when stderr is a TTY and "
    "--output text]; --progress forces it.",
)
@click.pass_context
def bench_command(
    ctx: click.Context,
    target: str,
    endpoints: str,
    connections: int,
    inflight: int,
    key_size: int,
    value_size: int,
    keyspace: int,
    mix_text: str,
    duration: float | None,
    requests: int | None,
    warmup: float,
    seed: int,
    consistency: str,
    txn_ops: int,
    txn_partitions: int,
    hot_keys: int,
    token: str | None,
    cacert: str | None,
    processes: int,
    connect_timeout: float,
    drain_timeout: float,
    output: str,
    prefix: str,
    cleanup: bool,
    request_ids: bool,
    route: str,
    cpu: bool,
    progress: bool | None,
) -> None:
    """Benchmark a dsnode (or Redis) server with pipelined puts, gets and txns.

    Latencies (microseconds) go into HDR histograms; the report gives throughput
    overall and per op, p50/p90/p99/p99.9/max and error counts by code. Against
    dsnode it also gives the route used with the share of answers the nodes had to
    forward, and each node's CPU seconds with the busiest node's CPU per 1,000
    acknowledged puts and the puts/s that implies with one core per node.

    Cross-partition transactions: ``--mix txn=1 --txn-partitions 2`` (keys in exactly
    two partitions); contention: ``--mix txn=1 --hot-keys 10`` (bank transfers among
    ten accounts: goodput and conflict rate).
    """
    endpoints, token, output = _inherit_group_settings(ctx, target, endpoints, token, output)
    try:
        config = BenchConfig(
            target=target,
            endpoints=tuple(e for e in endpoints.split(",") if e.strip()),
            connections=connections,
            inflight=inflight,
            key_size=key_size,
            value_size=value_size,
            keyspace=keyspace,
            mix=parse_mix(mix_text),
            duration=duration,
            requests=requests,
            warmup=warmup,
            seed=seed,
            consistency=consistency,
            txn_ops=txn_ops,
            txn_partitions=txn_partitions,
            hot_keys=hot_keys,
            token=token,
            cacert=cacert or ctx.find_root().meta.get("dsnode.tls_cacert"),
            processes=processes,
            connect_timeout=connect_timeout,
            drain_timeout=drain_timeout,
            prefix=prefix,
            cleanup=cleanup,
            request_ids=request_ids,
            route=route,
            cpu=cpu,
        ).validated()
    except BenchError as exc:
        raise click.UsageError(str(exc)) from None
    if output == "text" and config.connections < connections:
        click.echo(f"note: --connections lowered to {config.connections} (= --inflight)", err=True)
    show = progress if progress is not None else (output == "text" and sys.stderr.isatty())
    prog = Progress(sys.stderr) if show else None
    try:
        report = run_bench(config, prog)
    except BenchError as exc:
        if prog is not None:
            prog.close()
        raise click.ClickException(str(exc)) from None
    print_report(report, output)
