"""A listening socket on one address only (pure: the standard library's sockets).

torch's TCPStore server listens on every interface whatever host name it is given (torch 2.14:
`ss -ltn` shows `*:PORT`), and the store authenticates nobody. Every store pyddl hosts, the
launcher's (pyddl.launch.rendezvous) and rank 0's under srun/mpirun (pyddl.runtime), is
created on a socket from here and handed over as `master_listen_fd`.
"""

from __future__ import annotations

import socket

__all__ = ["listen_socket"]

_LISTEN_BACKLOG = 512


def listen_socket(addr: str, port: int) -> socket.socket:
    """Return a TCP socket listening on `addr`:`port` only (port 0: a free port).

    Raises:
        OSError: the address is not this machine's (EADDRNOTAVAIL), the port is taken, ...
    """
    family, kind, proto, _, sockaddr = socket.getaddrinfo(addr.strip("[]"), port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(_LISTEN_BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock
