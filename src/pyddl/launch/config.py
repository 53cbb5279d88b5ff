"""What a launch is: `RunConfig` (everything `pyddl run` was told, also the launcher's
programmatic API) and `LaunchError`. Pure: no process is started here."""

from __future__ import annotations

from dataclasses import dataclass, field

from pyddl.launch.hosts import DEFAULT_LAUNCHER
from pyddl.config import PYDDL_LINK_GBPS, PYDDL_RACK_GBPS, PYDDL_RACKS, PYDDL_TOPOLOGY, Settings
from pyddl.topology.spec import parse_topology

__all__ = ["RunConfig", "LaunchError", "RDZV_CONF_KEYS", "parse_rdzv_conf"]

# What `--rdzv-conf` may set for an elastic job: seconds, and a count for keep_alive_max_attempt
# (torchrun's names). A dead server leaves the rendezvous after keep_alive_interval x
# keep_alive_max_attempt (5 x 3 s), then the survivors wait last_call_timeout (30 s) for more.
RDZV_CONF_KEYS = ("join_timeout", "last_call_timeout", "close_timeout", "heartbeat", "read_timeout",
                  "keep_alive_interval", "keep_alive_max_attempt")


def parse_rdzv_conf(text: str) -> tuple[tuple[str, int], ...]:
    """Parse torchrun's `key=value,key=value` rendezvous options (positive integers).

    Example:
        >>> parse_rdzv_conf("last_call_timeout=2,keep_alive_interval=1")
        (('last_call_timeout', 2), ('keep_alive_interval', 1))
    """
    out = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in RDZV_CONF_KEYS or not value.isdigit() or int(value) < 1:
            raise ValueError(f"--rdzv-conf {item!r}: expected KEY=N with N a positive integer and KEY one of "
                             f"{', '.join(RDZV_CONF_KEYS)} (e.g. last_call_timeout=2)")
        out.append((key, int(value)))
    return tuple(out)


class LaunchError(RuntimeError):
    """The job failed; the message names the failed rank(s)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class RunConfig:
    """Everything `pyddl run` was told; also the programmatic API of the launcher.

    Example:
        >>> launch(RunConfig(nproc=4, command=("train.py", "--epochs", "1")))
    """

    nproc: int
    command: tuple[str, ...]
    # Settings of the collectives; None: the launcher's environment's, else the default.
    topology: str | None = None
    allreduce: str | None = None
    timeout_s: float | None = None
    chunk_bytes: int | None = None
    max_restarts: int = 0
    extra_env: dict = field(default_factory=dict)
    emulate_nodes: int | None = None
    emulate_link_gbps: float | None = None
    emulate_pin: bool = False
    emulate_mtu: int = 1500
    emulate_racks: int | None = None
    emulate_rack_gbps: float | None = None
    nnodes: int = 1
    max_nnodes: int | None = None
    node_rank: int | None = None
    master_addr: str | None = None
    master_port: int | None = None
    rdzv_conf: tuple = ()  # (key, seconds) pairs for the c10d rendezvous: RDZV_CONF_KEYS
    network_interface: str | None = None
    hosts: tuple = ()
    launcher: str = DEFAULT_LAUNCHER
    exit_with_stdin: bool = False
    # What every worker runs with: the fields above over the launcher's PYDDL_* environment.
    settings: Settings = field(init=False, repr=False)

    def __post_init__(self):
        # Checked here, once, before any worker starts: not in every worker after it did.
        object.__setattr__(self, "settings", Settings.from_env(
            topology=self.topology, allreduce=self.allreduce, timeout_s=self.timeout_s, chunk_bytes=self.chunk_bytes))
        if not isinstance(self.nproc, int) or self.nproc < 1:
            raise ValueError(f"-np must be a positive number of workers, got {self.nproc!r}")
        if not self.command:
            raise ValueError("no command to run: give a script, e.g. `pyddl run -np 4 train.py`")
        if self.max_restarts < 0:
            raise ValueError(f"--max-restarts must be >= 0, got {self.max_restarts}")
        spec = self.settings.topology
        if spec and self.nnodes == 1 and self.max_nnodes is None and not self.hosts:
            parse_topology(spec, self.nproc)
        self._check_emulation()
        self._check_nodes()

    @property
    def elastic(self) -> bool:
        """True for `--nnodes MIN:MAX` (c10d rendezvous): servers may come and go."""
        return self.max_nnodes is not None

    @property
    def multi_node(self) -> bool:
        """True when this launcher runs one server's share of a bigger job."""
        return self.nnodes > 1 or self.elastic

    def _check_nodes(self) -> None:
        if self.rdzv_conf and not self.elastic:
            raise ValueError("--rdzv-conf tunes the c10d rendezvous of an elastic job; add --nnodes MIN:MAX")
        if self.hosts:
            if self.multi_node or self.node_rank is not None or self.master_addr:
                raise ValueError("-H/--hostfile starts every server itself; drop --nnodes, --node-rank "
                                 "and --master-addr (pass --master-port to choose the port)")
            if self.emulate_nodes:
                raise ValueError("-H/--hostfile runs on the servers you list and --emulate-nodes on emulated "
                                 "ones on this machine; pick one")
            return
        if not isinstance(self.nnodes, int) or self.nnodes < 1:
            raise ValueError(f"--nnodes must be a positive number of servers (or MIN:MAX), got {self.nnodes!r}")
        if self.elastic and self.max_nnodes < self.nnodes:
            raise ValueError(f"--nnodes {self.nnodes}:{self.max_nnodes}: MIN must not exceed MAX")
        if self.master_port is not None and not 0 <= self.master_port < 65536:
            raise ValueError(f"--master-port must be a TCP port (0-65535), got {self.master_port}")
        if not self.multi_node:
            if self.node_rank not in (None, 0):
                raise ValueError(f"--node-rank {self.node_rank} needs --nnodes N > {self.node_rank}")
            return
        if self.emulate_nodes:
            raise ValueError("--emulate-nodes runs every emulated server from this launcher; drop --nnodes")
        if not self.master_addr:
            raise ValueError(f"--nnodes {self.nnodes} needs --master-addr: the address of node 0, whose "
                             f"launcher hosts the rendezvous store there (e.g. --master-addr 10.0.0.1)")
        if self.elastic:
            if self.node_rank is not None:
                raise ValueError("--node-rank does not apply to --nnodes MIN:MAX: the c10d rendezvous "
                                 "numbers the servers as they join; drop --node-rank")
            return
        if self.node_rank is None or not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"--nnodes {self.nnodes} needs --node-rank from 0 to {self.nnodes - 1} "
                             f"(this server's index; node 0 hosts the rendezvous), got {self.node_rank}")
        if self.max_restarts:
            raise ValueError(
                "--max-restarts with --nnodes N would restart this server's workers alone; use "
                "--nnodes N:N (c10d rendezvous: every server restarts) or -H (pyddl restarts every server)")

    def _check_emulation(self) -> None:
        if self.emulate_nodes is None:
            if (self.emulate_link_gbps is not None or self.emulate_pin or self.emulate_mtu != 1500
                    or self.emulate_racks is not None or self.emulate_rack_gbps is not None):
                raise ValueError(
                    "--emulate-link-gbps, --emulate-mtu, --emulate-pin, --emulate-racks and --emulate-rack-gbps "
                    "describe an emulated cluster; add --emulate-nodes M to create one"
                )
            return
        m = self.emulate_nodes
        if not isinstance(m, int) or m < 1:
            raise ValueError(f"--emulate-nodes must be a positive number of servers, got {m!r}")
        if self.nproc % m:
            raise ValueError(
                f"-np {self.nproc} workers do not split evenly over --emulate-nodes {m} servers; "
                f"pass a multiple of {m} to -np or a divisor of {self.nproc} to --emulate-nodes"
            )
        if self.emulate_link_gbps is not None and not self.emulate_link_gbps > 0:
            raise ValueError(f"--emulate-link-gbps must be a positive rate in Gbit/s, got {self.emulate_link_gbps}")
        self._check_racks()
        from pyddl.launch.emulate import NS_IFNAME

        if self.network_interface not in (None, NS_IFNAME):
            raise ValueError(f"--network-interface {self.network_interface}: every emulated server's link is "
                             f"{NS_IFNAME}, which the workers use already; drop the flag")

    def _check_racks(self) -> None:
        r, m = self.emulate_racks, self.emulate_nodes
        if r is None:
            if self.emulate_rack_gbps is not None:
                raise ValueError("--emulate-rack-gbps limits the uplinks between racks; add --emulate-racks R "
                                 f"(R divides --emulate-nodes {m}) to put the servers in racks")
            return
        from pyddl.launch.emulate import check_racks

        check_racks(m, r, self.emulate_rack_gbps)

    def worker_env(self) -> dict[str, str]:
        """The PYDDL_* variables every worker gets (on top of torchrun's)."""
        out = self.settings.to_env()
        if self.emulate_nodes:
            from pyddl.launch.emulate import NS_IFNAME

            # Emulated servers share one host name, so say who is where (innermost = ranks
            # per server) unless the user did, by flag or in the environment.
            if self.settings.topology is None:
                out[PYDDL_TOPOLOGY] = f"{self.nproc // self.emulate_nodes}x{self.emulate_nodes}"
            out["GLOO_SOCKET_IFNAME"] = NS_IFNAME
            if self.emulate_link_gbps is not None:
                out[PYDDL_LINK_GBPS] = repr(float(self.emulate_link_gbps))
            if self.emulate_racks is not None:
                out[PYDDL_RACKS] = str(self.emulate_racks)
            if self.emulate_rack_gbps is not None:
                out[PYDDL_RACK_GBPS] = repr(float(self.emulate_rack_gbps))
        if self.network_interface:
            # The data path only: Gloo and NCCL bind their connections to this interface.
            out["GLOO_SOCKET_IFNAME"] = out["NCCL_SOCKET_IFNAME"] = self.network_interface
        out.update({k: str(v) for k, v in self.extra_env.items()})
        return out

