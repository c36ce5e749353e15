"""The ``dsnode`` command line: client commands (get, put, del, txn, status, key, endpoint) and,
when their modules exist, ``serve``, ``bench`` and ``local-cluster``.

Behaviour (also in ``dsnode --help``):

- Exit status: 0 success; 1 an error (from the server, from the network, or ``not_found``
  for a missing key), or ``status --check`` / ``endpoint ...`` finding a node not ready;
  2 a usage error, including every input rejected before anything is sent (empty key, a
  key written twice in one txn branch, a malformed txn spec); 3 a write whose outcome is
  unknown (it may or may not have happened). A conditional put/delete or a txn whose
  compares fail is NOT an error (as in etcdctl): it prints ``succeeded: false``, exit 0.
- Every error is one line ``error: <code>: <message>`` on stderr in text mode, and one
  JSON object ``{"error": {"code", "message", "outcome_unknown"}}`` on stdout with
  ``--output json``; the exit status is the same in both. Codes are the server's
  (docs/PROTOCOL.md) plus ``not_found``, ``usage`` and the client-side ``connect_failed``,
  ``connection_lost`` and ``deadline_exceeded``.
- ``--output text`` (default) is for people: ``get`` prints the value and a newline,
  escaped (``\\xNN``, with a note on stderr) when it holds control characters or bytes
  that are not UTF-8; ``--raw`` writes the exact bytes, ``--hex`` hex. Keys are shown
  escaped the same way everywhere.
- ``--output json`` prints exactly one JSON object on stdout. Byte strings become text when
  they are valid UTF-8, otherwise base64 under the same name plus ``_b64`` (``value_b64``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import IO, Any, NoReturn, TypeVar

import click

from dsnode import __version__
from dsnode.cli_format import (
    escape,
    jsonable,
    key_placement,
    key_text,
    render_key,
    render_members,
    render_status,
    table,
)
from dsnode.client.client import (
    DEFAULT_DIAL_TIMEOUT,
    DEFAULT_TIMEOUT,
    Client,
    Op,
    TxnResult,
    parse_endpoints,
)
from dsnode.client.errors import ConnectFailed, DsnodeError, UnknownOp
from dsnode.client.ring import RingMap

DEFAULT_ENDPOINTS = "127.0.0.1:7379"
T = TypeVar("T")

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_OUTCOME_UNKNOWN = 3

ENDPOINTS_HINT = (
    "is a node running there? Name the nodes to try with --endpoints or "
    "DSNODE_ENDPOINTS=host:port,host:port,..."
)


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    endpoints: str
    timeout: float
    token: str | None
    output: str


class CommandError(click.ClickException):
    """An error with a code: ``error: <code>: <message>`` (or JSON), exit 1 by default."""

    exit_code = EXIT_ERROR

    def __init__(
        self,
        message: str,
        code: str = "error",
        exit_code: int | None = None,
        outcome_unknown: bool = False,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.outcome_unknown = outcome_unknown
        if exit_code is not None:
            self.exit_code = exit_code
        self.json = _json_wanted(click.get_current_context(silent=True))

    def show(self, file: IO[Any] | None = None) -> None:
        _show_error(self.code, self.format_message(), self.json, self.outcome_unknown)


def _json_wanted(ctx: click.Context | None, argv: list[str] | None = None) -> bool:
    """Whether errors must be JSON: from the command's settings when known, else from the
    raw arguments and environment (a usage error can come before options are parsed)."""
    if ctx is not None:
        chosen = ctx.meta.get("dsnode.output")
        if chosen is not None:
            return chosen == "json"
        settings = ctx.find_object(Settings)
        if settings is not None and argv is None:
            return settings.output == "json"
    args = list(sys.argv[1:] if argv is None else argv)
    for i, a in enumerate(args):
        if a in ("-o", "--output") and i + 1 < len(args):
            return args[i + 1] == "json"
        if a in ("--output=json", "-ojson"):
            return True
    return os.environ.get("DSNODE_OUTPUT") == "json"


def _show_error(code: str, message: str, as_json: bool, outcome_unknown: bool = False) -> None:
    if as_json:
        body: dict[str, Any] = {"code": code, "message": message}
        if outcome_unknown:
            body["outcome_unknown"] = True
        click.echo(json.dumps({"error": body}, ensure_ascii=False))
    else:
        click.echo(f"error: {code}: {message}", err=True)


def usage_error(message: str) -> NoReturn:
    """Input rejected before anything is sent: ``error: usage: ...``, exit 2."""
    raise CommandError(message, "usage", EXIT_USAGE)


def _remember(name: str) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """Callback of an option that is not passed to the command: keeps its value in
    ``ctx.meta`` (shared by the group and the subcommand; the subcommand's wins)."""

    def store(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is not None:
            ctx.meta[f"dsnode.{name}"] = value
        return value

    return store


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
            "--dial-timeout",
            type=click.FloatRange(min=0.001),
            envvar=env("DSNODE_DIAL_TIMEOUT"),
            default=DEFAULT_DIAL_TIMEOUT if group_level else None,
            show_default=group_level,
            expose_value=False,
            callback=_remember("dial_timeout"),
            help="Seconds to wait for a connection to some endpoint; an endpoint that "
            "refuses fails at once (env DSNODE_DIAL_TIMEOUT).",
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
            help="Nodes to try, in order; the others are learned from the first that "
            "answers (env DSNODE_ENDPOINTS).",
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
    ctx.meta["dsnode.output"] = merged.output
    try:
        parse_endpoints(merged.endpoints)
    except ValueError as exc:
        usage_error(f"--endpoints: {exc}")
    return merged


def _dial_timeout() -> float:
    ctx = click.get_current_context(silent=True)
    value = ctx.meta.get("dsnode.dial_timeout") if ctx is not None else None
    return DEFAULT_DIAL_TIMEOUT if value is None else float(value)


def _client(settings: Settings, endpoints: str | None = None, discover: bool = True) -> Client:
    # One request per command: fetching the partition map first would cost a round trip
    # (and maybe a second connection) to save the node one forwarding hop.
    return Client(
        endpoints or settings.endpoints,
        timeout=settings.timeout,
        token=settings.token,
        dial_timeout=_dial_timeout(),
        discover=discover,
        ring_aware=False,
        **_tls_kwargs(),
    )


def _error_from(exc: DsnodeError, endpoints: str) -> CommandError:
    """A client error as the CLI reports it (code, message, exit status)."""
    if isinstance(exc, ConnectFailed):
        return CommandError(
            f"no endpoint answered (tried {', '.join(exc.tried) or endpoints}); "
            + ENDPOINTS_HINT,
            exc.code,
        )
    if exc.indeterminate:
        return CommandError(
            f"{exc.message or exc.code} (outcome unknown: the write may or may not have "
            "happened; read the key to find out)",
            exc.code,
            EXIT_OUTCOME_UNKNOWN,
            outcome_unknown=True,
        )
    return CommandError(exc.message or exc.code, exc.code)


def _run(settings: Settings, action: Callable[[Client], Awaitable[T]]) -> T:
    """Connect, run ``action``, close; a DsnodeError becomes an error line and its exit
    status (1, or 3 when a write's outcome is unknown)."""
    try:
        client = _client(settings)  # checks the TLS files before anything is sent
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None

    async def go() -> T:
        async with client:
            return await action(client)

    try:
        return asyncio.run(go())
    except DsnodeError as exc:
        raise _error_from(exc, settings.endpoints) from None


# --------------------------------------------------------------------------- output helpers


def _print_json(obj: dict[str, Any]) -> None:
    click.echo(json.dumps(jsonable(obj), ensure_ascii=False))


def _bool(b: bool) -> str:
    return "true" if b else "false"


def _key_arg(key: str) -> bytes:
    data = key.encode("utf-8", "surrogateescape")
    if not data:
        usage_error("KEY must not be empty")
    return data


# --------------------------------------------------------------------------- the group

# click >= 8.2 raises this (a UsageError) for a group invoked without a subcommand.
_NO_ARGS_IS_HELP: type[Exception] = getattr(
    click.exceptions, "NoArgsIsHelpError", type("_Never", (Exception,), {})
)


class LazyGroup(click.Group):
    """A click group whose optional subcommands are imported on first use.

    Only the module (or a parent package) not existing is tolerated: the command is then
    simply absent. An ImportError from inside an existing module is a real bug and
    propagates when the command is invoked; ``--help`` lists it as failing to load.

    Errors, usage errors included, are printed as ``error: <code>: <message>`` (JSON with
    ``--output json``).
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

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        argv = kwargs.get("args", args[0] if args else None)
        argv = sys.argv[1:] if argv is None else list(argv)
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except CommandError as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except _NO_ARGS_IS_HELP as exc:  # `dsnode` alone: the help, as click shows it
            exc.show()
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            hint = ""
            if exc.ctx is not None:
                hint = f" (see '{exc.ctx.command_path} --help')"
            _show_error("usage", exc.format_message() + hint, _json_wanted(exc.ctx, argv))
            sys.exit(EXIT_USAGE)
        except click.ClickException as exc:
            _show_error("error", exc.format_message(), _json_wanted(None, argv))
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("aborted", err=True)
            sys.exit(EXIT_ERROR)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(
    cls=LazyGroup,
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog=(
        "Exit status: 0 success (including a failed compare: 'succeeded: false'); "
        "1 an error (server, network, not_found) or a node not ready (status --check, "
        "endpoint health/status); 2 usage error; 3 a write whose outcome is unknown. "
        "Errors print one line 'error: <code>: <message>' on stderr (a JSON object on "
        "stdout with -o json). Connection options may also follow the subcommand."
    ),
)
@_common_options(group_level=True)
@click.version_option(__version__, "--version", prog_name="dsnode")
@click.pass_context
def main(
    ctx: click.Context, endpoints: str, timeout: float, token: str | None, output: str
) -> None:
    """dsnode: a strongly consistent, replicated key-value store."""
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
@click.option("--raw", is_flag=True, help="Write the value's exact bytes, no newline (text).")
@click.option("--hex", "as_hex", is_flag=True, help="Print the value as hex (text).")
@click.option("--show-version", is_flag=True, help="Also print 'version: N' on stderr (text).")
@_common_options(group_level=False)
def get_command(
    key: str,
    consistency: str,
    raw: bool,
    as_hex: bool,
    show_version: bool,
    endpoints: str | None,
    timeout: float | None,
    token: str | None,
    output: str | None,
) -> None:
    """Print the value of KEY.

    Text output: the value and a newline. A value holding control characters or bytes
    that are not UTF-8 is shown escaped (\\xNN, backslashes doubled) with a note on
    stderr; --raw writes the exact bytes, --hex prints them as hex. JSON output:
    {"key", "value" (or "value_b64"), "version"}. A missing key is an error in both
    formats: 'error: not_found: ...', exit 1.
    """
    s = _settings(endpoints, timeout, token, output)
    if raw and as_hex:
        usage_error("--raw and --hex exclude each other")
    if s.output == "json" and (raw or as_hex or show_version):
        usage_error(
            "--raw, --hex and --show-version apply to text output; JSON output already has "
            "the version, and the value as value_b64 when it is not UTF-8"
        )
    kb = _key_arg(key)
    res = _run(s, lambda c: c.get(kb, consistency))
    if res.value is None:
        raise CommandError(f"key not found: {key_text(kb)}", "not_found")
    if s.output == "json":
        _print_json({"key": kb, "value": res.value, "version": res.version})
        return
    if show_version:
        click.echo(f"version: {res.version}", err=True)
    if raw:
        out = sys.stdout.buffer
        out.write(res.value)
        out.flush()
        return
    if as_hex:
        click.echo(res.value.hex())
        return
    text, escaped = escape(res.value)
    if escaped:
        click.echo(
            "note: the value holds control characters or bytes that are not UTF-8; shown "
            "escaped (--raw for the exact bytes, --hex for hex)",
            err=True,
        )
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
@click.option(
    "--allow-empty",
    is_flag=True,
    help="Store an empty value when stdin is empty (refused otherwise, as a likely mistake).",
)
@_common_options(group_level=False)
def put_command(
    key: str,
    value: str | None,
    if_version: int | None,
    allow_empty: bool,
    endpoints: str | None,
    timeout: float | None,
    token: str | None,
    output: str | None,
) -> None:
    """Set KEY to VALUE (UTF-8). With VALUE '-', or omitted and stdin not a terminal, the
    value is all of stdin, byte for byte (a trailing newline is kept: use printf or echo
    -n); empty stdin needs --allow-empty. Use '--' before a VALUE that starts with '-'.

    Prints 'succeeded: true|false' and 'version: N' (the new version, or the current one
    when --if-version did not match). A failed --if-version exits 0.
    """
    s = _settings(endpoints, timeout, token, output)
    kb = _key_arg(key)
    if value is None and sys.stdin.isatty():
        usage_error("no VALUE given and stdin is a terminal; give VALUE, or pipe it in")
    if value in (None, "-"):
        data = sys.stdin.buffer.read()
        if not data and not allow_empty:
            usage_error("stdin is empty; use --allow-empty to store an empty value")
    else:
        data = value.encode("utf-8", "surrogateescape")
    res = _run(s, lambda c: c.put(kb, data, if_version))
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
    help="Only if the key's current version is N (0: only if absent).",
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
    kb = _key_arg(key)
    res = _run(s, lambda c: c.delete(kb, if_version))
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
All three lists are optional. A compare holds when the key's current version equals
"version" (0: absent); only version compares exist (no value compares). Keys and values
are text (UTF-8); for arbitrary bytes use "key_b64" / "value_b64" (base64) instead.
"del" is accepted for "delete". A key may be written at most once per branch.

Text output: 'succeeded: true|false', then one line per sub-op of the branch that ran:
'get KEY: VALUE (version N)' or 'get KEY: (not found)', 'put KEY: version N',
'delete KEY: existed true|false' (keys and values escaped as by 'get'). JSON output:
{"succeeded", "results": [...]}. A false 'succeeded' exits 0.
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
        key = key_text(op.key)
        if op.op == "get":
            value = r.get("value")
            if value is None:
                click.echo(f"get {key}: (not found)")
            else:
                shown = escape(value, keep_newlines=False)[0]
                click.echo(f"get {key}: {shown} (version {r.get('version')})")
        elif op.op == "put":
            click.echo(f"put {key}: version {r.get('version')}")
        else:
            click.echo(f"delete {key}: existed {_bool(bool(r.get('existed')))}")


def _spec_error(message: str) -> NoReturn:
    usage_error(f"txn spec: {message}")


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


def _spec_key(entry: dict[str, Any], where: str) -> bytes:
    key = _spec_bytes(entry, "key", where)
    if not key:
        _spec_error(f"{where}: the key must not be empty")
    return key


def _spec_fields(entry: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = set(entry) - allowed
    if unknown:
        _spec_error(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")


# Fields of an etcd-style compare that dsnode does not have.
_ETCD_COMPARE_FIELDS = {
    "value", "value_b64", "target", "result", "create_revision", "mod_revision", "lease",
}


def parse_txn_spec(raw: bytes) -> tuple[list[tuple[bytes, int]], list[Op], list[Op]]:
    """Parse the JSON txn spec documented in ``dsnode txn --help``.

    Returns (compares, then, else); raises a usage error (exit 2) naming the problem.
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
        etcd = set(c) & _ETCD_COMPARE_FIELDS
        if etcd:
            _spec_error(
                f"{where}: only version compares exist ({{\"key\", \"version\"}}: the key's "
                f"current version equals it, 0 = absent); {', '.join(sorted(etcd))} "
                "is not supported. To compare a value, read the key's version first."
            )
        _spec_fields(c, {"key", "key_b64", "version"}, where)
        version = c.get("version")
        if type(version) is not int or version < 0:
            _spec_error(f"{where}: 'version' must be an integer >= 0")
        compares.append((_spec_key(c, where), version))
    branches: list[list[Op]] = []
    for name in ("then", "else"):
        ops: list[Op] = []
        written: set[bytes] = set()
        for i, o in enumerate(doc.get(name, [])):
            where = f"{name}[{i}]"
            if not isinstance(o, dict):
                _spec_error(f"{where}: must be an object")
            kind = o.get("op")
            key = _spec_key(o, where)
            if kind == "get":
                _spec_fields(o, {"op", "key", "key_b64"}, where)
                ops.append(Op.get(key))
                continue
            if kind == "put":
                _spec_fields(o, {"op", "key", "key_b64", "value", "value_b64"}, where)
                ops.append(Op.put(key, _spec_bytes(o, "value", where)))
            elif kind in ("delete", "del"):
                _spec_fields(o, {"op", "key", "key_b64"}, where)
                ops.append(Op.delete(key))
            else:
                _spec_error(f"{where}: 'op' must be get, put or delete")
            if key in written:
                _spec_error(f"{where}: key {key_text(key)} is written twice in '{name}'")
            written.add(key)
        branches.append(ops)
    return compares, branches[0], branches[1]


@main.command("status")
@click.option("--check", is_flag=True, help="Exit 1 when the node is not ready.")
@_common_options(group_level=False)
def status_command(
    check: bool,
    endpoints: str | None,
    timeout: float | None,
    token: str | None,
    output: str | None,
) -> None:
    """Show the contacted node's view: readiness, the ring (partitions, replication, epoch)
    and how many partitions it leads, then its members and one row per partition (id,
    replicas, leader, applied: '-' where this node holds no replica) as tables, then the
    rest (log, Paxos and peer details). With -o json, the status answer as it came.

    With --check the exit status is 1 when the node is not ready (it cannot serve
    linearizable requests now), for scripts and health checks.
    """
    s = _settings(endpoints, timeout, token, output)
    st = _run(s, lambda c: c.status())
    if s.output == "json":
        _print_json(st)
    else:
        for line in render_status(st):
            click.echo(line)
    if check and st.get("ready") is not True:
        sys.exit(EXIT_ERROR)


@main.command("key")
@click.argument("key")
@_common_options(group_level=False)
def key_command(
    key: str,
    endpoints: str | None,
    timeout: float | None,
    token: str | None,
    output: str | None,
) -> None:
    """Where KEY lives: its partition, that partition's replicas (in ring order, the first
    the preferred leader) and its current leader, from the contacted node's partition map.

    Text output: 'key', 'partition: N of P', 'replicas', 'leader' (with its address;
    '-' when the node knows of none) and the ring's 'epoch'. JSON output: {"key",
    "partition", "partitions", "replicas", "leader", "leader_addr", "epoch"}.
    """
    s = _settings(endpoints, timeout, token, output)
    kb = _key_arg(key)
    try:
        answer = _run(s, lambda c: c.ring())
    except CommandError as exc:
        if exc.code != UnknownOp.code:
            raise
        raise CommandError("this node has no partition map (the 'ring' op is newer than "
                           "it)", exc.code) from None
    try:
        ring = RingMap.from_wire(answer)
    except ValueError as exc:
        raise CommandError(f"malformed partition map from the server: {exc}",
                           "internal") from None
    info = key_placement(ring, kb)
    if s.output == "json":
        _print_json(info)
    else:
        for line in render_key(info):
            click.echo(line)


# --------------------------------------------------------------------------- member


@main.group("member")
def member_group() -> None:
    """The cluster's members as the contacted node sees them."""


@member_group.command("list")
@_common_options(group_level=False)
def member_list_command(
    endpoints: str | None,
    timeout: float | None,
    token: str | None,
    output: str | None,
) -> None:
    """Every member: id, address, state (alive, suspect, dead: the contacted node's
    failure detector), how long since it was heard from, and the replicas and partition
    leaderships it holds. With -o json, the status answer's members array."""
    s = _settings(endpoints, timeout, token, output)
    st = _run(s, lambda c: c.status())
    members = st.get("members") or []
    if s.output == "json":
        _print_json(members)
    else:
        for line in render_members(members):
            click.echo(line)


def _member_change(op: str, node_id: str, endpoints: str | None, timeout: float | None,
                   token: str | None, output: str | None) -> None:
    s = _settings(endpoints, timeout, token, output)
    res = _run(s, lambda c: c.request(op, {"node_id": node_id}))
    if s.output == "json":
        _print_json(res)
    else:
        click.echo(f"{node_id}: {res.get('state')} (ring epoch {res.get('epoch')})")


@member_group.command("leave")
@click.argument("node_id")
@_common_options(group_level=False)
def member_leave_command(node_id: str, endpoints: str | None, timeout: float | None,
                         token: str | None, output: str | None) -> None:
    """Take NODE_ID off the ring gracefully: its replicas move to the others first (it
    shows as leaving), then it is removed (left) and stops. Answered once the cluster
    chose the change; the moves go on in the background (dsnode member list, status)."""
    _member_change("member_leave", node_id, endpoints, timeout, token, output)


@member_group.command("remove")
@click.argument("node_id")
@_common_options(group_level=False)
def member_remove_command(node_id: str, endpoints: str | None, timeout: float | None,
                          token: str | None, output: str | None) -> None:
    """Remove NODE_ID (a dead node) at once: the replicas it held are rebuilt on the other
    members. It can come back only with a fresh data directory (serve --join)."""
    _member_change("member_remove", node_id, endpoints, timeout, token, output)


# --------------------------------------------------------------------------- endpoint


@main.group("endpoint")
def endpoint_group() -> None:
    """Check every endpoint (or, with --cluster, every member): health and status."""


async def _probe(settings: Settings, endpoint: str) -> dict[str, Any]:
    """One endpoint's status, timed; the error (as code and message) if it did not answer."""
    client = _client(settings, endpoint, discover=False)
    t0 = time.perf_counter()
    try:
        async with client:
            st = await client.status()
    except DsnodeError as exc:
        return {"endpoint": endpoint, "error": {"code": exc.code, "message": exc.message}}
    return {"endpoint": endpoint, "took_ms": round((time.perf_counter() - t0) * 1000, 1),
            "status": st}


async def _cluster_endpoints(settings: Settings) -> list[str]:
    """Every member's address, from the first endpoint that answers ``status``."""
    client = _client(settings, discover=False)
    async with client:
        st = await client.status()
    addrs = [m.get("addr") for m in st.get("members") or [] if isinstance(m, dict)]
    return [a for a in addrs if isinstance(a, str)]


def _probe_all(settings: Settings, cluster: bool) -> list[dict[str, Any]]:
    async def go() -> list[dict[str, Any]]:
        if cluster:
            try:
                eps = await _cluster_endpoints(settings)
            except DsnodeError as exc:
                raise _error_from(exc, settings.endpoints) from None
        else:
            eps = [f"{h}:{p}" if ":" not in h else f"[{h}]:{p}"
                   for h, p in parse_endpoints(settings.endpoints)]
        return list(await asyncio.gather(*(_probe(settings, e) for e in eps)))

    return asyncio.run(go())


def _endpoint_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = _common_options(group_level=False)(f)
    return click.option(
        "--cluster",
        is_flag=True,
        help="Check every member the first answering endpoint knows of, not just "
        "--endpoints.",
    )(f)


@endpoint_group.command("health")
@_endpoint_options
def endpoint_health_command(
    cluster: bool,
    endpoints: str | None,
    timeout: float | None,
    token: str | None,
    output: str | None,
) -> None:
    """Is each endpoint healthy (answering and ready to serve linearizable requests)?

    A table ENDPOINT, HEALTH, TOOK, ERROR, or with -o json {"endpoints": [{"endpoint",
    "health", "took_ms", "error"}]}. Exit status 1 when any endpoint is not healthy.
    """
    s = _settings(endpoints, timeout, token, output)
    rows = []
    for r in _probe_all(s, cluster):
        st = r.get("status")
        healthy = st is not None and st.get("ready") is True
        error = r.get("error")
        if error is not None:
            why = f"{error['code']}: {error['message']}"
        elif not healthy:
            why = "not ready (no leader reachable from this node)"
        else:
            why = None
        rows.append({"endpoint": r["endpoint"], "health": healthy,
                     "took_ms": r.get("took_ms"), "error": why})
    if s.output == "json":
        _print_json({"endpoints": rows})
    else:
        for line in table(["endpoint", "health", "took", "error"],
                          ([r["endpoint"], r["health"],
                            None if r["took_ms"] is None else f"{r['took_ms']}ms", r["error"]]
                           for r in rows)):
            click.echo(line)
    if not all(r["health"] for r in rows):
        sys.exit(EXIT_ERROR)


@endpoint_group.command("status")
@_endpoint_options
def endpoint_status_command(
    cluster: bool,
    endpoints: str | None,
    timeout: float | None,
    token: str | None,
    output: str | None,
) -> None:
    """Each endpoint's node id, leader, role, revision, keys, commit index and readiness.

    A table, or with -o json {"endpoints": [{"endpoint", "node_id", "leader", "role",
    "revision", "keys", "commit", "applied", "ready", "error"}]}. Exit status 1 when any
    endpoint is not ready or does not answer.
    """
    s = _settings(endpoints, timeout, token, output)
    rows = []
    for r in _probe_all(s, cluster):
        st = r.get("status") or {}
        paxos = st.get("paxos") if isinstance(st.get("paxos"), dict) else {}
        leaders = [p.get("leader") for p in st.get("partitions") or [] if isinstance(p, dict)]
        error = r.get("error")
        rows.append({
            "endpoint": r["endpoint"],
            "node_id": st.get("node_id"),
            "leader": ",".join(str(x) for x in leaders if x) or None,
            "role": paxos.get("role"),
            "revision": st.get("revision"),
            "keys": st.get("keys"),
            "commit": paxos.get("commit"),
            "applied": paxos.get("applied"),
            "ready": st.get("ready") is True,
            "error": None if error is None else f"{error['code']}: {error['message']}",
        })
    if s.output == "json":
        _print_json({"endpoints": rows})
    else:
        cols = ["endpoint", "node_id", "leader", "role", "revision", "keys", "commit",
                "applied", "ready", "error"]
        for line in table([c.replace("_", " ") for c in cols],
                          ([r[c] for c in cols] for r in rows)):
            click.echo(line)
    if not all(r["ready"] for r in rows):
        sys.exit(EXIT_ERROR)


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
    main.add_lazy_command("top", "dsnode.top", "top_command")


_register_optional()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
