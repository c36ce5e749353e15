"""Network namespaces for partition tests: one namespace per node, a bridge between them.

Layout (every name carries a per-run prefix ``dsnt<pid>x<n>``, every address is in
one private /24 ``10.213.X.0/24`` that no existing route of this machine covers):

* a hub namespace ``<prefix>-hub`` holding the bridge ``br0``;
* per node ``i`` a namespace ``<prefix>-n<i>`` with ``lo`` and one veth end
  (``10.213.X.(10+i)``), its other end a port of ``br0``;
* one veth pair from the root namespace to the bridge (``10.213.X.1`` on the root
  side), so the test process itself is the client. Node-to-node traffic stays in
  the hub namespace: the root namespace's firewall (Docker's FORWARD DROP with
  bridge netfilter) never sees it, and nothing in the root namespace is changed
  except that one veth, deleted at cleanup.

Partitions are iptables DROP rules inside a node's own namespace (INPUT from
and OUTPUT to the cut peers), so the client link to that node stays up.

:meth:`NetLab.close` kills nothing but deletes the namespaces and the root veth;
call it after the node processes are dead (:class:`harness.ServerPool` does that).
:func:`sweep_stale` removes what an earlier, killed run left behind (names whose
pid no longer exists).
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from harness import ServerPool, ServerProcess

if TYPE_CHECKING:
    from cluster_harness import Cluster

PORT = 7379
_seq = itertools.count(1)
_NAME_RE = re.compile(r"^dsnt(\d+)x\d+")


class NetnsUnavailable(Exception):
    """Namespaces cannot be created here; the message says why (tests skip with it)."""


def run(*argv: str, check: bool = True, timeout: float = 10.0) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=check)


def ns_run(ns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return run("ip", "netns", "exec", ns, *argv, check=check)


def unavailable_reason() -> str | None:
    """Why these tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "network namespace tests need root"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install -y iproute2 iptables)"
    probe = f"dsnt{os.getpid()}x0-probe"
    try:
        r = run("ip", "netns", "add", probe, check=False)
        if r.returncode != 0:
            return f"cannot create a network namespace: {r.stderr.strip()}"
        r = ns_run(probe, "iptables", "-S", check=False)
        if r.returncode != 0:
            return f"iptables does not work inside a namespace: {r.stderr.strip()}"
    finally:
        run("ip", "netns", "del", probe, check=False)
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale() -> list[str]:
    """Delete namespaces and root veths of earlier runs whose process is gone."""
    removed = []
    r = run("ip", "netns", "list", check=False)
    for line in r.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = _NAME_RE.match(name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            run("ip", "netns", "del", name, check=False)
            removed.append(name)
    r = run("ip", "-o", "link", "show", check=False)
    for line in r.stdout.splitlines():
        parts = line.split(":")
        if len(parts) < 2:
            continue
        name = parts[1].strip().split("@")[0]
        m = _NAME_RE.match(name)
        if m and not _pid_alive(int(m.group(1))):
            run("ip", "link", "del", name, check=False)
            removed.append(name)
    return removed


def _free_subnet() -> ipaddress.IPv4Network:
    """A 10.213.X.0/24 that overlaps no address or route on this machine."""
    used = run("ip", "-4", "route", "show", "table", "all", check=False).stdout
    used += run("ip", "-4", "addr", check=False).stdout
    start = os.getpid() % 250
    for i in range(250):
        x = (start + i) % 250 + 1
        if f"10.213.{x}." not in used and "10.213.0.0/16" not in used:
            return ipaddress.IPv4Network(f"10.213.{x}.0/24")
    raise NetnsUnavailable("no free 10.213.X.0/24 subnet")


class NetLab:
    """The namespaces, veths and bridge of one test; :meth:`close` removes them all."""

    def __init__(self, node_ids: list[str]) -> None:
        self.prefix = f"dsnt{os.getpid()}x{next(_seq)}"
        if len(self.prefix) + 2 > 15:  # interface names are at most 15 bytes
            raise NetnsUnavailable(f"prefix {self.prefix} too long for interface names")
        self.node_ids = list(node_ids)
        self.hub = f"{self.prefix}-hub"
        self.ns: dict[str, str] = {}
        self.ip: dict[str, str] = {}
        self.root_veth = f"{self.prefix}r"
        self.net: ipaddress.IPv4Network | None = None
        self.client_ip = ""
        self._created_ns: list[str] = []
        self._cut: set[tuple[str, str]] = set()

    # ------------------------------------------------------------ set-up
    def setup(self) -> NetLab:
        try:
            self._setup()
        except subprocess.CalledProcessError as e:
            self.close()
            raise NetnsUnavailable(
                f"network set-up failed: {' '.join(e.cmd)}: {(e.stderr or '').strip()}"
            ) from None
        except BaseException:
            self.close()
            raise
        return self

    def _add_ns(self, name: str) -> None:
        run("ip", "netns", "add", name)
        self._created_ns.append(name)
        ns_run(name, "ip", "link", "set", "lo", "up")

    def _setup(self) -> None:
        self.net = _free_subnet()
        hosts = list(self.net.hosts())
        self.client_ip = str(hosts[0])
        plen = self.net.prefixlen
        self._add_ns(self.hub)
        ns_run(self.hub, "ip", "link", "add", "br0", "type", "bridge")
        ns_run(self.hub, "ip", "link", "set", "br0", "up")
        # the test process's own link: root side keeps the client address
        run("ip", "link", "add", self.root_veth, "type", "veth", "peer", "name", "up0",
            "netns", self.hub)
        ns_run(self.hub, "ip", "link", "set", "up0", "master", "br0", "up")
        run("ip", "addr", "add", f"{self.client_ip}/{plen}", "dev", self.root_veth)
        run("ip", "link", "set", self.root_veth, "up")
        for i, nid in enumerate(self.node_ids, start=1):
            ns = f"{self.prefix}-{nid}"
            self._add_ns(ns)
            self.ns[nid] = ns
            self.ip[nid] = str(hosts[9 + i])
            port_name = f"p{i}"
            run("ip", "netns", "exec", ns, "ip", "link", "add", "eth0", "type", "veth",
                "peer", "name", port_name, "netns", self.hub)
            ns_run(self.hub, "ip", "link", "set", port_name, "master", "br0", "up")
            ns_run(ns, "ip", "addr", "add", f"{self.ip[nid]}/{plen}", "dev", "eth0")
            ns_run(ns, "ip", "link", "set", "eth0", "up")

    # ------------------------------------------------------------ partitions
    def cut(self, a: str, b: str) -> None:
        """Drop all traffic between nodes ``a`` and ``b`` (rules in ``a``'s namespace)."""
        if (a, b) in self._cut:
            return
        ns, peer = self.ns[a], self.ip[b]
        ns_run(ns, "iptables", "-I", "INPUT", "-s", peer, "-j", "DROP")
        ns_run(ns, "iptables", "-I", "OUTPUT", "-d", peer, "-j", "DROP")
        self._cut.add((a, b))

    def isolate(self, nid: str) -> None:
        """Cut ``nid`` from every other node; the client still reaches it."""
        for other in self.node_ids:
            if other != nid:
                self.cut(nid, other)

    def heal(self) -> None:
        for a, b in sorted(self._cut):
            ns, peer = self.ns[a], self.ip[b]
            ns_run(ns, "iptables", "-D", "INPUT", "-s", peer, "-j", "DROP")
            ns_run(ns, "iptables", "-D", "OUTPUT", "-d", peer, "-j", "DROP")
        self._cut.clear()

    # ------------------------------------------------------------ cleanup
    def close(self) -> None:
        """Delete every namespace and veth this lab created (idempotent)."""
        for ns in reversed(self._created_ns):
            run("ip", "netns", "del", ns, check=False)
        self._created_ns.clear()
        with contextlib.suppress(Exception):
            if run("ip", "link", "show", self.root_veth, check=False).returncode == 0:
                run("ip", "link", "del", self.root_veth, check=False)

    def leftovers(self) -> list[str]:
        """Names of this lab still present (for the test's own cleanup assertion)."""
        out = [ln.split()[0] for ln in run("ip", "netns", "list", check=False).stdout.splitlines()
               if ln.startswith(self.prefix + "-")]
        if run("ip", "link", "show", self.root_veth, check=False).returncode == 0:
            out.append(self.root_veth)
        return out


class NsServer(ServerProcess):
    """A ``dsnode serve`` run inside a node's namespace, listening on its address there."""

    def __init__(self, lab: NetLab, nid: str, base: Path, args: tuple[str, ...]) -> None:
        super().__init__(base / f"data-{nid}", base / f"server-{nid}.log", node_id=nid,
                         port=PORT, args=args)
        self.lab = lab

    @property
    def addr(self) -> tuple[str, int]:
        return (self.lab.ip[self.node_id], self.port)

    @property
    def listen(self) -> str:
        return f"{self.lab.ip[self.node_id]}:{self.port}"

    def argv(self) -> list[str]:
        # The address is on a private veth inside throwaway namespaces that only this test can
        # reach, so plain text without tokens is allowed explicitly (docs/SECURITY.md).
        return ["ip", "netns", "exec", self.lab.ns[self.node_id], *super().argv(),
                "--insecure", "true"]


@contextlib.contextmanager
def lab_cluster(
    base: Path, ids: list[str], extra_args: tuple[str, ...] = ()
) -> Iterator[tuple[NetLab, Cluster]]:
    """A :class:`NetLab` and a not-yet-started :class:`Cluster` of :class:`NsServer` nodes
    (``extra_args`` added to each one's flags) on :data:`PORT` of their own addresses.
    Skips the test when namespaces cannot be made; afterwards kills every process, then
    deletes the namespaces, and fails if any is left behind."""
    import pytest
    from cluster_harness import Cluster

    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    sweep_stale()
    lab = NetLab(ids)
    pool = ServerPool(base)
    try:
        try:
            lab.setup()
        except NetnsUnavailable as e:
            pytest.skip(str(e))

        def make(nid: str, addr: tuple[str, int], flags: tuple[str, ...]) -> NsServer:
            srv = NsServer(lab, nid, base, (*flags, *extra_args))
            pool.servers.append(srv)  # the pool's close() kills it
            return srv

        yield lab, Cluster(pool, len(ids), args=(), make_server=make,
                           addrs={nid: (lab.ip[nid], PORT) for nid in ids})
    finally:
        pool.close()  # processes first: a namespace lives on while a process is inside
        lab.close()
        left = lab.leftovers()
        assert not left, f"network namespaces/links left behind: {left}"
