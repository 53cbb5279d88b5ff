"""Who is where: ranks -> (server, local) coordinates and one process group per dim slice."""

from pyddl.topology.spec import Topology, parse_topology, servers_from_keys

__all__ = ["Topology", "parse_topology", "servers_from_keys"]
