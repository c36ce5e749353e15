"""The ``dsnode`` command line: client commands (get, put, del, txn, status) and, when their
modules exist, ``serve`` and ``bench``.

Behaviour (also in ``dsnode --help``):

- Exit status: 0 success; 1 a server or network error, or ``get`` of a missing key in text
  mode, with one line ``error: <code>: <message>`` on stderr; 2 a usage error (bad option,
  bad endpoint, malformed txn spec). A conditional put/delete or a txn whose compares fail is
  NOT an error (as in etcdctl): it prints ``succeeded: false`` and exits 0.
- ``--output text`` (default) is for people: ``get`` prints the value and a newline (non-UTF-8
  bytes are shown backslash-escaped, with a warning on stderr; ``--raw`` writes the exact
  bytes instead); ``--show-version`` adds ``version: N`` on stderr. Other commands print
  ``name: value`` lines.
- ``--output json`` prints exactly one JSON object on stdout. Byte strings become text when
  they are valid UTF-8, otherwise base64 under the same name plus ``_b64`` (``value_b64``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import IO, Any, NoReturn, TypeVar

import click

from dsnode import __version__
from dsnode.client.client import DEFAULT_TIMEOUT, Client, Op, TxnResult, parse_endpoints
from dsnode.client.errors import DsnodeError

DEFAULT_ENDPOINTS = "127.0.0.1:7379"
T = TypeVar("T")


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    endpoints: str
    timeout: float
    token: str | None
    output: str


class CommandError(click.ClickException):
    """Prints ``error: <message>`` on stderr and exits 1."""

    exit_code = 1

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


def _common_options(group_level: bool) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The connection/output options, accepted both before and after the subcommand.

    Group-level ones carry the environment variables and defaults; a subcommand-level value,
    when given, overrides the group-level one.
    """

    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        env = (lambda name: name) if group_level else (lambda name: None)
        f = click.option(
            "--output",
            "-o",
            type=click.Choice(["text", "json"]),
            envvar=env("DSNODE_OUTPUT"),
            default="text" if group_level else None,
            show_default=group_level,
            help="Output format (env DSNODE_OUTPUT).",
        )(f)
        for name, what in TLS_OPTIONS.items():
            f = click.option(
                f"--{name}",
                f"tls_{name}",
                envvar=env(f"DSNODE_{name.upper()}"),
                default=None,
                expose_value=False,
                callback=_remember_tls,
                type=click.Path(dir_okay=False),
                help=f"{what} (env DSNODE_{name.upper()}).",
            )(f)
        f = click.option(
            "--token",
            envvar=env("DSNODE_TOKEN"),
            default=None,
            help="Authentication token sent in hello (env DSNODE_TOKEN).",
        )(f)
        f = click.option(
            "--timeout",
            type=click.FloatRange(min=0.001),
            envvar=env("DSNODE_TIMEOUT"),
            default=DEFAULT_TIMEOUT if group_level else None,
            show_default=group_level,
            help="Deadline per request, seconds (env DSNODE_TIMEOUT).",
        )(f)
        f = click.option(
            "--endpoints",
            envvar=env("DSNODE_ENDPOINTS"),
            default=DEFAULT_ENDPOINTS if group_level else None,
            show_default=group_level,
            metavar="HOST:PORT,...",
            help="Nodes to try, in order (env DSNODE_ENDPOINTS).",
        )(f)
        return f

    return decorate


TLS_OPTIONS = {
    "key": "Private key of --cert",
    "cert": "Client certificate (PEM) for nodes that require one",
    "cacert": "CA certificate (PEM) that signed the nodes' certificates; turns TLS on",
}


def _remember_tls(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    """--cacert/--cert/--key: a subcommand-level value overrides the group-level one."""
    if value is not None:
        ctx.find_root().meta[f"dsnode.{param.name}"] = value


def _tls_kwargs() -> dict[str, str | None]:
    meta = click.get_current_context().find_root().meta
    return {name: meta.get(f"dsnode.tls_{name}") for name in TLS_OPTIONS}


def _settings(
    endpoints: str | None, timeout: float | None, token: str | None, output: str | None
) -> Settings:
    ctx = click.get_current_context()
    base: Settings = ctx.find_object(Settings) or Settings(
        DEFAULT_ENDPOINTS, DEFAULT_TIMEOUT, None, "text"
    )
    merged = Settings(
        endpoints if endpoints is not None else base.endpoints,
        timeout if timeout is not None else base.timeout,
        token if token is not None else base.token,
        output if output is not None else base.output,
    )
    try:
        parse_endpoints(merged.endpoints)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--endpoints") from None
    return merged


def _run(settings: Settings, action: Callable[[Client], Awaitable[T]]) -> T:
    """Connect, run ``action``, close; a DsnodeError becomes ``error: ...`` and exit 1."""

    try:
        tls = _tls_kwargs()
        Client(settings.endpoints, **tls)  # checks the TLS files before anything is sent
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None

    async def go() -> T:
        async with Client(
            settings.endpoints, timeout=settings.timeout, token=settings.token, **tls
        ) as client:
            return await action(client)

    try:
        return asyncio.run(go())
    except DsnodeError as exc:
        raise CommandError(str(exc)) from None


# --------------------------------------------------------------------------- output helpers


def _text(data: bytes) -> str:
    """UTF-8 text, or a backslash-escaped rendering of bytes that are not UTF-8."""
    try:
        return data.decode()
    except UnicodeDecodeError:
        return data.decode("utf-8", "backslashreplace")


def _jsonable(obj: Any) -> Any:
    """Make a response JSON-ready: bytes under key ``k`` become text, or base64 under
    ``k_b64`` when not UTF-8; bytes inside lists become text or ``{"b64": ...}``."""
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            name = k if isinstance(k, str) else _text(k) if isinstance(k, bytes) else str(k)
            if isinstance(v, bytes):
                try:
                    out[name] = v.decode()
                except UnicodeDecodeError:
                    out[name + "_b64"] = base64.b64encode(v).decode()
            else:
                out[name] = _jsonable(v)
        return out
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, bytes):
        try:
            return obj.decode()
        except UnicodeDecodeError:
            return {"b64": base64.b64encode(obj).decode()}
    return obj


def _print_json(obj: dict[str, Any]) -> None:
    click.echo(json.dumps(_jsonable(obj), ensure_ascii=False))


def _bool(b: bool) -> str:
    return "true" if b else "false"


# --------------------------------------------------------------------------- the group


class LazyGroup(click.Group):
    """A click group whose optional subcommands are imported on first use.

    Only the module (or a parent package) not existing is tolerated: the command is then
    simply absent. An ImportError from inside an existing module is a real bug and
    propagates when the command is invoked; ``--help`` lists it as failing to load.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lazy: dict[str, tuple[str, str]] = {}

    def add_lazy_command(self, name: str, module: str, attr: str) -> None:
        self._lazy[name] = (module, attr)

    def _load(self, name: str) -> click.Command | None:
        import importlib

        module, attr = self._lazy[name]
        parts = module.split(".")
        own = {".".join(parts[: i + 1]) for i in range(len(parts))}
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name in own:
                return None
            raise
        cmd = getattr(mod, attr)
        self.add_command(cmd, name)
        del self._lazy[name]
        return cmd

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self._lazy))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self._lazy:
            return self._load(cmd_name)
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        for name in list(self._lazy):
            try:
                self._load(name)
            except Exception as exc:  # shown, not hidden: invoking it raises
                self._lazy.pop(name)
                broken = click.Command(name, help=f"[failed to load: {exc!r}]")
                self.add_command(broken, name)
        super().format_commands(ctx, formatter)


@click.group(
    cls=LazyGroup,
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog=(
        "Exit status: 0 success (including a failed compare: 'succeeded: false'); "
        "1 server/network error, or get of a missing key in text mode; 2 usage error. "
        "Errors print one line 'error: <code>: <message>' on stderr. "
        "Connection options may also follow the subcommand."
    ),
)
@_common_options(group_level=True)
@click.version_option(__version__, "--version", prog_name="dsnode")
@click.pass_context
def main(
    ctx: click.Context, endpoints: str, timeout: float, token: str | None, output: str
) -> None:
    """dsnode: a strongly consistent, partitioned, replicated key-value store."""
    ctx.obj = Settings(endpoints, timeout, token, output)


@main.command("get")
@click.argument("key")
@click.option(
    "--consistency",
    type=click.Choice(["linearizable", "stale"]),
    default="linearizable",
    show_default=True,
    help="'stale' may be served by any replica and may lag.",
)
@click.option("--raw", is_flag=True, help="Write the value's exact bytes, no newline.")
@click.option("--show-version", is_flag=True, help="Also print 'version: N' on stderr.")
@_common_options(group_level=False)
def get_command(
    key: str,
    consistency: str,
    raw: bool,
    show_version: bool,
    endpoints: str | None,
    timeout: float | None,
    token: str | None,
    output: str | None,
) -> None:
    """Print the value of KEY.

    Text output: the value and a newline; values that are not UTF-8 are shown
    backslash-escaped (use --raw for the bytes). A missing key prints
    'error: key not found: KEY' on stderr and exits 1. JSON output:
    {"key", "value" (or "value_b64"), "version"}; a missing key has "value": null,
    "version": 0 and exits 0.
    """
    s = _settings(endpoints, timeout, token, output)
    res = _run(s, lambda c: c.get(key, consistency))
    if s.output == "json":
        _print_json({"key": key, "value": res.value, "version": res.version})
        return
    if res.value is None:
        raise CommandError(f"key not found: {key}")
    if show_version:
        click.echo(f"version: {res.version}", err=True)
    if raw:
        out = sys.stdout.buffer
        out.write(res.value)
        out.flush()
        return
    try:
        text = res.value.decode()
    except UnicodeDecodeError:
        click.echo("warning: value is not UTF-8; shown escaped (use --raw)", err=True)
        text = res.value.decode("utf-8", "backslashreplace")
    click.echo(text)


@main.command("put")
@click.argument("key")
@click.argument("value", required=False)
@click.option(
    "--if-version",
    type=click.IntRange(min=0),
    default=None,
    help="Only if the key's current version is N (0: only if absent).",
)
@_common_options(group_level=False)
def put_command(
    key: str,
    value: str | None,
    if_version: int | None,
    endpoints: str | None,
    timeout: float | None,
    token: str | None,
    output: str | None,
) -> None:
    """Set KEY to VALUE (UTF-8). With VALUE omitted or '-', the value is all of stdin,
    byte for byte (a trailing newline is kept: use printf or echo -n). Use '--' before a
    VALUE that starts with '-'.

    Prints 'succeeded: true|false' and 'version: N' (the new version, or the current one
    when --if-version did not match). A failed --if-version exits 0.
    """
    s = _settings(endpoints, timeout, token, output)
    data = sys.stdin.buffer.read() if value in (None, "-") else value.encode()
    res = _run(s, lambda c: c.put(key, data, if_version))
    if s.output == "json":
        _print_json({"succeeded": res.succeeded, "version": res.version})
    else:
        click.echo(f"succeeded: {_bool(res.succeeded)}\nversion: {res.version}")


@main.command("del")
@click.argument("key")
@click.option(
    "--if-version",
    type=click.IntRange(min=0),
    default=None,
    help="Only if the key's current version is N.",
)
@_common_options(group_level=False)
def del_command(
    key: str,
    if_version: int | None,
    endpoints: str | None,
    timeout: float | None,
    token: str | None,
    output: str | None,
) -> None:
    """Delete KEY. Prints 'succeeded', 'existed' and 'version' (the version the key had
    before, 0 if absent). Deleting a missing key succeeds with existed: false. A failed
    --if-version exits 0."""
    s = _settings(endpoints, timeout, token, output)
    res = _run(s, lambda c: c.delete(key, if_version))
    if s.output == "json":
        _print_json({"succeeded": res.succeeded, "existed": res.existed, "version": res.version})
    else:
        click.echo(
            f"succeeded: {_bool(res.succeeded)}\nexisted: {_bool(res.existed)}\n"
            f"version: {res.version}"
        )


TXN_SPEC_HELP = """\
Run a transaction read as JSON from SPEC (a file, or '-' for stdin, the default):

\b
  {"if":   [{"key": "a", "version": 0}],
   "then": [{"op": "put", "key": "a", "value": "1"},
            {"op": "get", "key": "b"},
            {"op": "delete", "key": "c"}],
   "else": [{"op": "get", "key": "a"}]}

\b
All three lists are optional. "version" 0 means "absent". Keys and values are text
(UTF-8); for arbitrary bytes use "key_b64" / "value_b64" (base64) instead. "del" is
accepted for "delete".

Text output: 'succeeded: true|false', then one line per sub-op of the branch that ran:
'get KEY: VALUE (version N)' or 'get KEY: (not found)', 'put KEY: version N',
'delete KEY: existed true|false'. JSON output: {"succeeded", "results": [...]}.
A false 'succeeded' exits 0.
"""


@main.command("txn", help=TXN_SPEC_HELP)
@click.argument("spec", type=click.File("rb"), default="-")
@_common_options(group_level=False)
def txn_command(
    spec: IO[bytes],
    endpoints: str | None,
    timeout: float | None,
    token: str | None,
    output: str | None,
) -> None:
    s = _settings(endpoints, timeout, token, output)
    compares, then, else_ = parse_txn_spec(spec.read())
    res: TxnResult = _run(s, lambda c: c.txn(compares, then, else_))
    if s.output == "json":
        _print_json({"succeeded": res.succeeded, "results": res.results})
        return
    click.echo(f"succeeded: {_bool(res.succeeded)}")
    for op, r in zip(then if res.succeeded else else_, res.results, strict=False):
        key = _text(op.key)
        if op.op == "get":
            value = r.get("value")
            if value is None:
                click.echo(f"get {key}: (not found)")
            else:
                click.echo(f"get {key}: {_text(value)} (version {r.get('version')})")
        elif op.op == "put":
            click.echo(f"put {key}: version {r.get('version')}")
        else:
            click.echo(f"delete {key}: existed {_bool(bool(r.get('existed')))}")


def _spec_error(message: str) -> NoReturn:
    raise click.BadParameter(message, param_hint="SPEC")


def _spec_bytes(entry: dict[str, Any], name: str, where: str) -> bytes:
    if name in entry:
        if not isinstance(entry[name], str):
            _spec_error(f"{where}: {name!r} must be a string")
        return entry[name].encode()
    b64 = name + "_b64"
    if b64 in entry:
        if not isinstance(entry[b64], str):
            _spec_error(f"{where}: {b64!r} must be a base64 string")
        try:
            return base64.b64decode(entry[b64], validate=True)
        except binascii.Error:
            _spec_error(f"{where}: {b64!r} is not valid base64")
    _spec_error(f"{where}: needs {name!r} or {b64!r}")


def parse_txn_spec(raw: bytes) -> tuple[list[tuple[bytes, int]], list[Op], list[Op]]:
    """Parse the JSON txn spec documented in ``dsnode txn --help``.

    Returns (compares, then, else); raises click.BadParameter (exit 2) naming the problem.
    """
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        _spec_error(f"not valid JSON: {exc}")
    if not isinstance(doc, dict):
        _spec_error("must be a JSON object with 'if', 'then', 'else'")
    unknown = set(doc) - {"if", "then", "else"}
    if unknown:
        _spec_error(f"unknown field(s): {', '.join(sorted(unknown))}")
    for name in ("if", "then", "else"):
        if not isinstance(doc.get(name, []), list):
            _spec_error(f"'{name}' must be a list")
    compares: list[tuple[bytes, int]] = []
    for i, c in enumerate(doc.get("if", [])):
        where = f"if[{i}]"
        if not isinstance(c, dict):
            _spec_error(f"{where}: must be an object")
        version = c.get("version")
        if type(version) is not int or version < 0:
            _spec_error(f"{where}: 'version' must be an integer >= 0")
        compares.append((_spec_bytes(c, "key", where), version))
    branches: list[list[Op]] = []
    for name in ("then", "else"):
        ops: list[Op] = []
        for i, o in enumerate(doc.get(name, [])):
            where = f"{name}[{i}]"
            if not isinstance(o, dict):
                _spec_error(f"{where}: must be an object")
            kind = o.get("op")
            key = _spec_bytes(o, "key", where)
            if kind == "get":
                ops.append(Op.get(key))
            elif kind == "put":
                ops.append(Op.put(key, _spec_bytes(o, "value", where)))
            elif kind in ("delete", "del"):
                ops.append(Op.delete(key))
            else:
                _spec_error(f"{where}: 'op' must be get, put or delete")
        branches.append(ops)
    return compares, branches[0], branches[1]


@main.command("status")
@_common_options(group_level=False)
def status_command(
    endpoints: str | None, timeout: float | None, token: str | None, output: str | None
) -> None:
    """Show the contacted node's view: identity, readiness, members and partitions."""
    s = _settings(endpoints, timeout, token, output)
    st = _run(s, lambda c: c.status())
    if s.output == "json":
        _print_json(st)
        return
    members = st.get("members") or []
    partitions = st.get("partitions") or []
    for name, value in st.items():
        if name in ("members", "partitions"):
            continue
        if isinstance(value, bool):
            shown = _bool(value)
        elif isinstance(value, bytes):
            shown = _text(value)
        elif isinstance(value, dict | list):
            shown = json.dumps(_jsonable(value), ensure_ascii=False)
        else:
            shown = str(value)
        click.echo(f"{name}: {shown}")
    click.echo(f"members: {len(members)}")
    for m in members:
        click.echo(f"  {m.get('node_id')}  {m.get('addr')}  {m.get('state')}")
    click.echo(f"partitions: {len(partitions)}")
    for p in partitions:
        replicas = ",".join(str(r) for r in p.get("replicas") or [])
        click.echo(f"  {p.get('id')}  leader={p.get('leader') or '-'}  replicas={replicas}")


# --------------------------------------------------------------------------- optional commands


def _register_optional() -> None:
    """Register ``serve`` and ``bench``, written in other packages, by module path.

    They are imported only when invoked (or listed by ``--help``), so the client commands
    work, and start fast, whatever state those modules are in.
    """
    main.add_lazy_command("serve", "dsnode.runtime.main", "serve_command")
    main.add_lazy_command("bench", "dsnode.bench.cli", "bench_command")
    main.add_lazy_command("certs", "dsnode.certs", "certs_command")
    main.add_lazy_command("token-hash", "dsnode.certs", "token_hash_command")
    main.add_lazy_command("local-cluster", "dsnode.runtime.local_cluster", "local_cluster_command")


_register_optional()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
