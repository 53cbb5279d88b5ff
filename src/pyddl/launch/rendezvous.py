"""torchrun's rendezvous, with every store this launcher hosts listening on one address only.

torch's TCPStore server listens on every interface whatever host name it is given (torch
2.14: `ss -ltn` shows `*:PORT`). The handlers here create the same stores on a socket bound
to the address the user gave and hand it over as `master_listen_fd`, so the store, which
authenticates nobody, is reachable only there (issue 6; docs/launch.md). Registered with
torch's rendezvous registry as "pyddl-static" (node 0 hosts) and "pyddl-c10d" (elastic).
"""

from __future__ import annotations

import errno
import socket
from datetime import timedelta

from torch.distributed import TCPStore
from torch.distributed.elastic.rendezvous import (
    RendezvousInfo, RendezvousParameters, RendezvousStoreInfo, rendezvous_handler_registry,
)
from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import DynamicRendezvousHandler, RendezvousTimeout
from torch.distributed.elastic.rendezvous.static_tcp_rendezvous import StaticTCPRendezvous, create_rdzv_handler
from torch.distributed.elastic.rendezvous.utils import parse_rendezvous_endpoint

from pyddl.listen import listen_socket

__all__ = ["STATIC", "C10D", "RendezvousBindError", "register", "format_endpoint"]

STATIC = "pyddl-static"
C10D = "pyddl-c10d"
_C10D_DEFAULT_PORT = 29400  # torchrun's


class RendezvousBindError(RuntimeError):
    """This server cannot listen where it was told to host the rendezvous store."""


def format_endpoint(addr: str, port: int) -> str:
    """`addr:port`, with an IPv6 address in brackets as parse_rendezvous_endpoint expects."""
    return f"[{addr}]:{port}" if ":" in addr and not addr.startswith("[") else f"{addr}:{port}"


def _bind_error(addr: str, port: int, err: OSError, role: str) -> RendezvousBindError:
    if err.errno == errno.EADDRNOTAVAIL:
        fix = f"{addr} is not an address of this server; give one of its own addresses"
    elif err.errno == errno.EADDRINUSE:
        fix = f"port {port} is in use on {addr}; pick another --master-port"
    else:
        fix = str(err)
    return RendezvousBindError(f"cannot host the {role} on {format_endpoint(addr, port)}: {fix}")


def _bound_store(addr: str, port: int, role: str, **kw) -> tuple[TCPStore, socket.socket]:
    try:
        listener = listen_socket(addr, port)
    except OSError as err:
        raise _bind_error(addr, port, err, role) from None
    store = TCPStore(addr.strip("[]"), listener.getsockname()[1], is_master=True, multi_tenant=True,
                     master_listen_fd=listener.fileno(), **kw)
    return store, listener


class _BoundStaticRendezvous(StaticTCPRendezvous):
    """torch's static rendezvous (node 0 hosts the store, the others connect), plus a fresh
    store for the workers at every round: torch hands the workers the agent's own store and
    adds no per-attempt prefix, so after a restart Gloo could read the dead workers' addresses
    (seen as `connectFullMesh ... Connection refused` on a restarted `pyddl train`)."""

    def __init__(self, *args):
        super().__init__(*args)
        self._round = 0
        # Stores stay referenced (and listening) for the agent's life: a TCPStore does not
        # own the descriptor it was given.
        self._kept: list[tuple[TCPStore, socket.socket]] = []

    def get_backend(self) -> str:
        return STATIC

    def next_rendezvous(self):
        if self._store is None and self.rank == 0:
            store, listener = _bound_store(
                self.master_addr, self.master_port, "rendezvous store (--master-addr/--master-port)",
                world_size=self.world_size, timeout=self.timeout)
            self._kept.append((store, listener))
            self._store, self.master_port = store, listener.getsockname()[1]
        info = super().next_rendezvous()
        self._round += 1
        key = f"pyddl/workers_store/{self._round}"
        if self.rank == 0:
            store, listener = _bound_store(self.master_addr, 0, "workers' store (--master-addr)")
            self._kept.append((store, listener))
            info.store.set(key, str(listener.getsockname()[1]))
        port = int(info.store.get(key))
        return RendezvousInfo(info.store, info.rank, info.world_size, RendezvousStoreInfo(self.master_addr, port))


class _BoundDynamicHandler(DynamicRendezvousHandler):
    """torch's c10d rendezvous; the store it shares with the workers (hosted by whichever
    node becomes rank 0) listens on that node's address only, and is new at every round
    (see _BoundStaticRendezvous for why)."""

    _rdzv_listener: socket.socket | None = None
    _kept: tuple = ()  # every round's workers' store, referenced for the agent's life

    def get_backend(self) -> str:
        return C10D

    def next_rendezvous(self):
        self._bootstrap_store_info = None
        self._shared_tcp_store_server = None
        return super().next_rendezvous()

    def _create_tcp_store_server(self, master_addr, master_port) -> TCPStore:
        store, listener = _bound_store(
            master_addr, master_port, "workers' store (this server's address: --network-interface or its host name)")
        self._kept += ((store, listener),)
        return store


def _create_static(params: RendezvousParameters) -> StaticTCPRendezvous:
    base = create_rdzv_handler(params)
    return _BoundStaticRendezvous(base.master_addr, base.master_port, base.rank, base.world_size,
                                  base.run_id, int(base.timeout.total_seconds()))


def _seconds(params: RendezvousParameters, key: str) -> timedelta | None:
    value = params.get_as_int(key)
    return None if value is None else timedelta(seconds=value)


def _create_c10d(params: RendezvousParameters) -> DynamicRendezvousHandler:
    host, port = parse_rendezvous_endpoint(params.endpoint, default_port=_C10D_DEFAULT_PORT)
    read_timeout = timedelta(seconds=params.get_as_int("read_timeout", 60))
    try:
        listener = listen_socket(host, port)
    except OSError as err:
        # Not this server's address, or another agent on this machine hosts it already
        # (torch's own c10d backend falls back to a client the same way).
        if err.errno not in (errno.EADDRNOTAVAIL, errno.EADDRINUSE):
            raise _bind_error(host, port, err, "rendezvous store (--master-addr/--master-port)") from None
        listener = None
    store = TCPStore(host.strip("[]"), port, is_master=listener is not None, multi_tenant=True,
                     timeout=read_timeout, master_listen_fd=listener.fileno() if listener else None)
    timeout = RendezvousTimeout(
        _seconds(params, "join_timeout"), _seconds(params, "last_call_timeout"),
        _seconds(params, "close_timeout"), _seconds(params, "heartbeat"))
    # torch's own c10d handler reads these two as well; a dead server leaves the rendezvous
    # after interval x attempts (5 x 3 s by default), and the survivors wait that long.
    handler = _BoundDynamicHandler.from_backend(
        params.run_id, store, C10dRendezvousBackend(store, params.run_id), params.min_nodes,
        params.max_nodes, params.local_addr, timeout,
        keep_alive_interval=params.get_as_int("keep_alive_interval", 5),
        keep_alive_max_attempt=params.get_as_int("keep_alive_max_attempt", 3))
    handler._rdzv_listener = listener
    return handler


def register() -> None:
    """Make "pyddl-static" and "pyddl-c10d" known to torch's rendezvous registry (idempotent)."""
    rendezvous_handler_registry.register(STATIC, _create_static)
    rendezvous_handler_registry.register(C10D, _create_c10d)
