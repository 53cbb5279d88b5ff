"""An emulated cluster on one machine: M "servers" as network namespaces joined by a bridge.

Each server is a namespace holding one veth link (named `eth0` inside, so GLOO_SOCKET_IFNAME
is the same for every rank) to a bridge in the root namespace; tc tbf limits that link to G
Gbit/s each way (issue 4). Ranks of one server talk over its own address, which the kernel
routes through `lo`, so only traffic between servers is limited. With R racks (issue 24) the
servers of a rack share a rack bridge, whose uplink (a veth pair, tbf-limited to G2 Gbit/s each
way) meets the others at the spine bridge. Needs root and iproute2.
A live cluster holds a lock on its slot, so a later start cleans a killed run's leftovers
(slot unlocked) and never a running neighbour's (slot locked).
"""

from __future__ import annotations

import atexit
import fcntl
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import threading
from dataclasses import dataclass

__all__ = [
    "EmulatedCluster",
    "EmulationError",
    "ServerSpec",
    "RackSpec",
    "check_racks",
    "tbf_params",
    "cpu_sets",
    "NS_IFNAME",
    "NO_ROOT_MESSAGE",
]

NS_IFNAME = "eth0"  # the link's name inside every server's namespace
NO_ROOT_MESSAGE = "--emulate-nodes needs root (network namespaces and tc); run as root or drop the flag"
_NETWORK = "10.213.{slot}.0/24"  # one /24 per live cluster, never routed beyond its bridge
_MAX_SLOTS = 16
_MAX_NODES = 200
_LOCK_DIR = "/run/pyddl-emulate"
# iproute2's place for a namespace's own /etc files (`ip netns exec` bind-mounts them, and so
# does netns_exec): a hosts file naming every address of the cluster, so that a reverse
# lookup in a server (c10d logs the peer of each connection) answers at once instead of
# failing on a DNS server the namespace cannot reach ("The hostname of the client socket
# cannot be retrieved. err=-3" on every rank, issue 23 point 15).
NETNS_ETC = "/etc/netns"
_MIN_MTU, _MAX_MTU = 576, 65535
# What follows `{prefix}{slot}` in the name of everything a cluster makes in the root namespace
# or as a namespace: the spine bridge (`br`), server i's namespace (`s<i>`) and its link's
# bridge end (`v<i>`), rack j's bridge (`r<j>`) and its uplink's rack end (`r<j>u`) and spine
# end (`r<j>s`). The bridges are deleted last, once no link is on them.
_SUFFIX = r"(?:br|s\d+|v\d+|r\d+[us]?)"
_BRIDGE_SUFFIX = r"(?:br|r\d+)"


class EmulationError(RuntimeError):
    """The emulated cluster could not be set up (no root, no iproute2, no free slot, ...)."""


@dataclass(frozen=True)
class ServerSpec:
    """One emulated server: its namespace, its link's bridge-side name, its address and its rack."""

    index: int
    netns: str
    host_link: str
    address: str
    rack: int = 0


@dataclass(frozen=True)
class RackSpec:
    """One emulated rack: its bridge and the rack and spine ends of its uplink."""

    index: int
    bridge: str
    uplink: str
    spine_link: str


def tbf_params(link_gbps: float) -> tuple[int, int]:
    """Return (burst_bytes, limit_bytes) for a tbf qdisc of `link_gbps`.

    The burst covers 2 ms at the rate and the queue 20 ms: measured on this kernel, a single
    TCP flow then reaches the configured rate, while a larger queue only adds latency
    (docs/emulation.md). The burst is at least 128 KiB, so that a whole GSO segment (64 KiB of
    payload and its headers) fits and is never split: with a 64 KiB floor, at 0.25 Gbit/s tbf
    cut every segment into packets and held back 318k of 391k of them, and the senders burned
    7x the CPU they spend at 0.5 Gbit/s.
    """
    if link_gbps <= 0:
        raise ValueError(f"--emulate-link-gbps must be a positive rate in Gbit/s, got {link_gbps}")
    bytes_per_s = link_gbps * 1e9 / 8
    burst = max(128 * 1024, int(bytes_per_s * 0.002))
    limit = max(2 * burst, int(bytes_per_s * 0.020))
    return burst, limit


def check_racks(nodes: int, racks: int, rack_gbps: float | None) -> None:
    """Check a rack layout of `nodes` servers (the launcher's flags and the cluster alike).

    Raises:
        ValueError: racks not a positive int or not dividing nodes, or rack_gbps not positive.
    """
    if isinstance(racks, bool) or not isinstance(racks, int) or racks < 1:
        raise ValueError(f"--emulate-racks must be a positive number of racks, got {racks!r}")
    if nodes % racks:
        raise ValueError(f"--emulate-nodes {nodes} servers do not split evenly over --emulate-racks {racks} racks; "
                         f"pass a multiple of {racks} to --emulate-nodes or a divisor of {nodes} to --emulate-racks")
    if rack_gbps is not None and not rack_gbps > 0:
        raise ValueError(f"--emulate-rack-gbps must be a positive rate in Gbit/s, got {rack_gbps}")


def cpu_sets(nodes: int, cpus: list[int]) -> list[list[int]]:
    """Split `cpus` into one set per server: equal consecutive shares, or one core each in
    turn when there are fewer cores than servers (with 2 cores and 2 servers, server i gets
    core i)."""
    cpus = sorted(cpus)
    if not cpus:
        raise ValueError("no CPU to pin to: the launcher's affinity mask is empty")
    if len(cpus) < nodes:
        return [[cpus[i % len(cpus)]] for i in range(nodes)]
    share = len(cpus) // nodes
    return [cpus[i * share:(i + 1) * share] for i in range(nodes)]


def _ip(*args: str, check: bool = True) -> str:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise EmulationError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")
    return proc.stdout


def _tc(*args: str) -> None:
    proc = subprocess.run(["tc", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise EmulationError(f"`tc {' '.join(args)}` failed: {proc.stderr.strip()}")


def _json_list(text: str) -> list:
    # `ip -j netns list` prints nothing at all when there is no namespace.
    return json.loads(text) if text.strip() else []


class EmulatedCluster:
    """Create M emulated servers for the life of a `with` block, then remove every trace.

    Args:
        nodes: the number of servers M (namespaces), at least 1.
        link_gbps: each server's link rate in Gbit/s, both directions; None leaves it
            unlimited (still a real veth hop, useful as the reference).
        mtu: the links' MTU in bytes: 1500 as on commodity Ethernet (TCP payload is then at
            most 1448/1514 = 95.6% of the rate), 9000 for a jumbo-frame fabric (99.3%).
        prefix: names of namespaces and links start with it (letters/digits, at most 6).
        racks: the number of racks R; R > 1 puts M/R consecutive servers behind each rack's
            bridge, and the racks' uplinks into the spine bridge (`bridge`). R = 1: no racks,
            every server on `bridge`.
        rack_gbps: each rack uplink's rate in Gbit/s, both directions; None leaves it unlimited.

    Raises:
        EmulationError: not root, `ip`/`tc` missing, or every slot held by a live cluster.
        ValueError: bad nodes, link_gbps, mtu, prefix, racks or rack_gbps.

    Example:
        >>> with EmulatedCluster(2, 1.0) as cluster:
        ...     cluster.servers[1].netns, cluster.bridge_address
        ('pyddl0s1', '10.213.0.1')
        >>> with EmulatedCluster(4, 1.0, racks=2, rack_gbps=0.5) as cluster:
        ...     cluster.servers[2].rack, cluster.racks[1].bridge, cluster.racks[1].uplink
        (1, 'pyddl0r1', 'pyddl0r1u')
    """

    def __init__(self, nodes: int, link_gbps: float | None = None, mtu: int = 1500, prefix: str = "pyddl",
                 racks: int = 1, rack_gbps: float | None = None):
        if not isinstance(nodes, int) or not 1 <= nodes <= _MAX_NODES:
            raise ValueError(f"--emulate-nodes must be a number of servers from 1 to {_MAX_NODES}, got {nodes!r}")
        if link_gbps is not None:
            tbf_params(link_gbps)
        if not isinstance(mtu, int) or not _MIN_MTU <= mtu <= _MAX_MTU:
            raise ValueError(f"--emulate-mtu must be {_MIN_MTU} to {_MAX_MTU} bytes, got {mtu!r}")
        if not re.fullmatch(r"[a-z][a-z0-9]{0,5}", prefix):
            raise ValueError(f"emulation prefix must be 1-6 lower-case letters/digits starting with a letter, got {prefix!r}")
        check_racks(nodes, racks, rack_gbps)
        self.nodes = nodes
        self.link_gbps = link_gbps
        self.mtu = mtu
        self.prefix = prefix
        self.rack_count = racks
        self.rack_gbps = rack_gbps
        self.slot: int | None = None
        self.servers: list[ServerSpec] = []
        self.racks: list[RackSpec] = []
        self.bridge = ""
        self.bridge_address = ""
        self._lock_fd: int | None = None
        self._old_handlers: dict = {}

    # -- names -------------------------------------------------------------------------------

    def _leftovers(self) -> dict[int, tuple[list[str], list[str]]]:
        """slot -> (namespaces, root-namespace links) that exist under this prefix, live or stale."""
        pattern = re.compile(rf"{self.prefix}(\d+){_SUFFIX}")
        found: dict[int, tuple[list[str], list[str]]] = {}
        names = [(n["name"], 0) for n in _json_list(_ip("-j", "netns", "list"))]
        names += [(ln["ifname"], 1) for ln in _json_list(_ip("-j", "link", "show"))]
        for name, kind in names:
            m = pattern.fullmatch(name)
            if m:
                found.setdefault(int(m.group(1)), ([], []))[kind].append(name)
        return found

    # -- slots -------------------------------------------------------------------------------

    def _try_lock(self, slot: int) -> int | None:
        os.makedirs(_LOCK_DIR, exist_ok=True)
        fd = os.open(os.path.join(_LOCK_DIR, f"{self.prefix}{slot}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def _network_is_free(self, slot: int) -> bool:
        # Never shadow a network the machine really uses: skip a slot whose /24 overlaps a route
        # on a link that is not one of ours.
        net = ipaddress.ip_network(_NETWORK.format(slot=slot))
        pattern = re.compile(rf"{self.prefix}\d+{_SUFFIX}")
        for route in _json_list(_ip("-j", "-4", "route", "show", "table", "all")):
            dst = route.get("dst", "")
            if dst in ("default", "") or pattern.fullmatch(route.get("dev", "")):
                continue
            try:
                if ipaddress.ip_network(dst, strict=False).overlaps(net):
                    return False
            except ValueError:
                continue
        return True

    def _clean_slot(self, slot: int) -> None:
        """Remove everything `slot` left behind: processes in its namespaces, links, namespaces."""
        netns, links = self._leftovers().get(slot, ([], []))
        for ns in netns:
            # Workers of a killed launcher live on inside their namespace; they are ours.
            for pid in _ip("netns", "pids", ns, check=False).split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
        # Deleting one end of a veth pair deletes the other, so a second `del` may find nothing.
        bridge = re.compile(rf"{self.prefix}\d+{_BRIDGE_SUFFIX}")
        for link in sorted(links, key=lambda name: bool(bridge.fullmatch(name))):
            _ip("link", "del", link, check=False)
        for ns in netns:
            _ip("netns", "del", ns, check=False)
            shutil.rmtree(os.path.join(NETNS_ETC, ns), ignore_errors=True)

    def _claim_slot(self) -> int:
        chosen = None
        stale = set(self._leftovers())
        for slot in range(_MAX_SLOTS):
            if chosen is not None and slot not in stale:
                continue
            fd = self._try_lock(slot)
            if fd is None:
                continue
            self._clean_slot(slot)
            if chosen is None and self._network_is_free(slot):
                chosen, self._lock_fd = slot, fd
            else:
                os.close(fd)
        if chosen is None:
            raise EmulationError(
                f"no free emulation slot: {_MAX_SLOTS} emulated clusters are running (or their "
                f"networks 10.213.0-{_MAX_SLOTS - 1}.0/24 are in use); wait for one to end"
            )
        return chosen

    # -- set up / tear down ------------------------------------------------------------------

    def _check_can_run(self) -> None:
        if os.geteuid() != 0:
            raise EmulationError(NO_ROOT_MESSAGE)
        missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
        if missing:
            raise EmulationError(
                f"--emulate-nodes needs {' and '.join(missing)} (iproute2); install it, e.g. "
                "`apt-get install iproute2`, or drop the flag"
            )

    def _limit(self, gbps: float, *dev: str) -> None:
        burst, limit = tbf_params(gbps)
        _tc(*dev, "root", "tbf", "rate", f"{gbps * 1000:g}mbit", "burst", str(burst), "limit", str(limit))

    def _add_bridge(self, name: str) -> None:
        _ip("link", "add", name, "mtu", str(self.mtu), "type", "bridge")
        _ip("link", "set", name, "up")

    def _add_racks(self, slot: int) -> None:
        """Rack j: a bridge, and an uplink veth pair from it into the spine bridge."""
        self.racks = []
        if self.rack_count == 1:
            return
        for j in range(self.rack_count):
            rack = RackSpec(j, f"{self.prefix}{slot}r{j}", f"{self.prefix}{slot}r{j}u", f"{self.prefix}{slot}r{j}s")
            self.racks.append(rack)
            self._add_bridge(rack.bridge)
            _ip("link", "add", rack.uplink, "mtu", str(self.mtu), "type", "veth",
                "peer", "name", rack.spine_link, "mtu", str(self.mtu))
            for end, bridge in ((rack.uplink, rack.bridge), (rack.spine_link, self.bridge)):
                _ip("link", "set", end, "master", bridge)
                _ip("link", "set", end, "up")
                if self.rack_gbps is not None:
                    # Each end shapes what it sends: the rack end out of the rack, the spine end into it.
                    self._limit(self.rack_gbps, "qdisc", "add", "dev", end)

    def _build(self, slot: int) -> None:
        net = ipaddress.ip_network(_NETWORK.format(slot=slot))
        hosts = list(net.hosts())
        self.bridge = f"{self.prefix}{slot}br"
        self.bridge_address = str(hosts[0])
        self.servers = []
        self._add_bridge(self.bridge)
        _ip("addr", "add", f"{self.bridge_address}/{net.prefixlen}", "dev", self.bridge)
        self._add_racks(slot)
        per_rack = self.nodes // self.rack_count
        for i in range(self.nodes):
            server = ServerSpec(i, f"{self.prefix}{slot}s{i}", f"{self.prefix}{slot}v{i}", str(hosts[1 + i]),
                                i // per_rack)
            self.servers.append(server)
            _ip("netns", "add", server.netns)
            _ip("link", "add", server.host_link, "mtu", str(self.mtu), "type", "veth",
                "peer", "name", NS_IFNAME, "mtu", str(self.mtu), "netns", server.netns)
            switch = self.racks[server.rack].bridge if self.racks else self.bridge
            _ip("link", "set", server.host_link, "master", switch)
            _ip("link", "set", server.host_link, "up")
            _ip("-n", server.netns, "link", "set", "lo", "up")
            _ip("-n", server.netns, "addr", "add", f"{server.address}/{net.prefixlen}", "dev", NS_IFNAME)
            _ip("-n", server.netns, "link", "set", NS_IFNAME, "up")
            if self.link_gbps is not None:
                self._limit(self.link_gbps, "qdisc", "add", "dev", server.host_link)  # into the server: download
                self._limit(self.link_gbps, "-n", server.netns, "qdisc", "add", "dev", NS_IFNAME)  # out: upload
        self._write_hosts()

    def _write_hosts(self) -> None:
        try:
            with open("/etc/hosts") as fh:
                base = fh.read()
        except OSError:
            base = "127.0.0.1\tlocalhost\n"
        names = [(self.bridge_address, self.bridge)] + [(s.address, s.netns) for s in self.servers]
        # c10d's sockets are IPv6 with IPv4-mapped addresses, which glibc looks up as written.
        text = base.rstrip("\n") + "\n# pyddl emulated cluster\n" + "".join(
            f"{a}\t{n}\n::ffff:{a}\t{n}\n" for a, n in names)
        for server in self.servers:
            folder = os.path.join(NETNS_ETC, server.netns)
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, "hosts"), "w") as fh:
                fh.write(text)

    def _on_signal(self, signum, frame):
        raise SystemExit(128 + signum)

    def __enter__(self) -> "EmulatedCluster":
        if self._lock_fd is not None:
            raise RuntimeError("this emulated cluster is already up; create a new EmulatedCluster per `with`")
        self._check_can_run()
        self.slot = self._claim_slot()
        atexit.register(self.close)
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGHUP):
                self._old_handlers[sig] = signal.signal(sig, self._on_signal)
        try:
            self._build(self.slot)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Remove the namespaces, links and lock of this cluster; safe to call twice."""
        if self._lock_fd is None:
            return
        try:
            self._clean_slot(self.slot)
        finally:
            os.close(self._lock_fd)
            self._lock_fd = None
            for sig, handler in self._old_handlers.items():
                signal.signal(sig, handler)
            self._old_handlers.clear()
            atexit.unregister(self.close)

    @property
    def netns_prefix(self) -> str:
        """Server i's namespace is this prefix followed by i."""
        return f"{self.prefix}{self.slot}s"
