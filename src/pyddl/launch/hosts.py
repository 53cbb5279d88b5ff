"""Servers of a multi-server job: parse -H / --hostfile, place ranks, build each server's command.

Pure: nothing is started here (pyddl.launch.remote runs what this builds). Ranks fill the
servers in the order given, so the ranks of one server are consecutive and the i-th server
used is node i of the job, which is what pyddl's topology needs (docs/launch.md).
"""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
import string
from dataclasses import dataclass
from typing import Mapping, Sequence

__all__ = [
    "DEFAULT_LAUNCHER",
    "Host",
    "Placement",
    "parse_hosts",
    "parse_hostfile",
    "place_ranks",
    "launcher_words",
    "host_address",
    "check_command",
    "remote_command",
    "forwarded_env",
]

# BatchMode: a host that would ask for a password fails at the reachability check instead of
# hanging on a prompt nobody sees.
DEFAULT_LAUNCHER = "ssh -o BatchMode=yes"
# Launchers that hand their arguments to the remote login shell as one command line (so the
# line must be quoted once more); every other launcher (ip netns exec, docker exec, srun, ...)
# execs its arguments, and gets `sh -c LINE`.
_SHELL_LAUNCHERS = ("ssh", "rsh")
_PLACEHOLDERS = ("host", "node")
# RFC 1123 host names (labels of letters, digits and inner hyphens, dot-separated; an IPv4
# address is one too), an optional `user@` (a POSIX user name: never starts with `-`), or an
# IPv6 address in brackets. Anything else, e.g. `-Fevil.conf`, would reach ssh as an option.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST_RE = re.compile(rf"(?:[A-Za-z0-9_][A-Za-z0-9_.-]*@)?(?:{_LABEL}(?:\.{_LABEL})*\.?|\[([0-9A-Fa-f:.]+(?:%[A-Za-z0-9_.-]+)?)\])")


@dataclass(frozen=True)
class Host:
    """A server named on the command line and how many workers it may run."""

    name: str
    slots: int


@dataclass(frozen=True)
class Placement:
    """One server's share of the job: node index, number of workers and its first rank."""

    host: str
    node: int
    nproc: int
    first_rank: int

    @property
    def ranks(self) -> range:
        return range(self.first_rank, self.first_rank + self.nproc)


def _is_host(name: str) -> bool:
    m = _HOST_RE.fullmatch(name)
    if not m or len(host_address(name)) > 253:
        return False
    if m.group(1) is None:
        return True
    try:
        ipaddress.IPv6Address(m.group(1))
    except ValueError:
        return False
    return True


def host_address(name: str) -> str:
    """The address part of a validated host name: `user@node1` -> `node1`."""
    return name.rpartition("@")[2]


def _host(name: str, slots: int, where: str) -> Host:
    if not _is_host(name):
        raise ValueError(f"{where}: {name!r} is not a host name or address; write e.g. host1:4, "
                         f"user@host1:4, 10.0.0.2:4 or [fe80::1]:4")
    if slots < 1:
        raise ValueError(f"{where}: {name} has {slots} slots; give at least 1 (e.g. {name}:4)")
    return Host(name, slots)


def _check_unique(hosts: list[Host], where: str) -> tuple[Host, ...]:
    seen = set()
    for h in hosts:
        if h.name in seen:
            raise ValueError(f"{where}: host {h.name} is listed twice; list each server once with all its slots")
        seen.add(h.name)
    if not hosts:
        raise ValueError(f"{where}: no host given; write e.g. -H host1:4,host2:4")
    return tuple(hosts)


def parse_hosts(spec: str) -> tuple[Host, ...]:
    """Parse `-H host1:4,host2:4` (a bare host has 1 slot; an IPv6 address goes in brackets).

    Raises:
        ValueError: an empty list, a bad name or slot count, or a host listed twice.

    Example:
        >>> parse_hosts("a:2,b")
        (Host(name='a', slots=2), Host(name='b', slots=1))
    """
    hosts = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        m = re.fullmatch(r"(\[[^\]]+\]|[^:]+)(?::(\w+))?", item)
        if not m:
            raise ValueError(f"-H: cannot read {item!r}; write host:slots, e.g. host1:4 or [fe80::1]:4")
        slots = m.group(2) or "1"
        if not slots.isdigit():
            raise ValueError(f"-H: {item!r} has slots {slots!r}; slots must be a whole number, e.g. host1:4")
        hosts.append(_host(m.group(1), int(slots), "-H"))
    return _check_unique(hosts, "-H")


def parse_hostfile(text: str, path: str = "hostfile") -> tuple[Host, ...]:
    """Parse a hostfile: one `host slots=N` per line (a bare host has 1 slot), `#` comments.

    Raises:
        ValueError: a line that is not `host [slots=N]`, naming the file and line.
    """
    hosts = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{path}:{lineno}"
        m = re.fullmatch(r"(\S+)(?:\s+slots\s*=\s*(\S+))?", line)
        if not m:
            raise ValueError(f"{where}: cannot read {raw.strip()!r}; each line is `host slots=N`, e.g. `node1 slots=4`")
        slots = m.group(2) or "1"
        if not slots.isdigit():
            raise ValueError(f"{where}: slots={slots!r} is not a whole number; write e.g. `{m.group(1)} slots=4`")
        hosts.append(_host(m.group(1), int(slots), where))
    return _check_unique(hosts, path)


def place_ranks(hosts: Sequence[Host], nproc: int) -> list[Placement]:
    """Give `nproc` ranks to the servers in order, filling each server's slots before the next.

    Servers left with no rank are not used. Every used server must get the same number of
    ranks: pyddl's topology is ranks-per-server x servers (docs/architecture.md).

    Raises:
        ValueError: more ranks than slots, or servers unevenly filled (with the fix).

    Example:
        >>> [(p.host, p.node, p.nproc, p.first_rank) for p in place_ranks(parse_hosts("a:2,b:2"), 4)]
        [('a', 0, 2, 0), ('b', 1, 2, 2)]
    """
    total = sum(h.slots for h in hosts)
    listing = ",".join(f"{h.name}:{h.slots}" for h in hosts)
    if nproc > total:
        raise ValueError(f"-np {nproc} is more than the {total} slots of {listing}; pass -np {total} or add slots")
    placements, rank = [], 0
    for h in hosts:
        n = min(h.slots, nproc - rank)
        if n == 0:
            break
        placements.append(Placement(h.name, len(placements), n, rank))
        rank += n
    counts = [p.nproc for p in placements]
    if len(set(counts)) > 1:
        per = nproc // len(placements)
        fix = (f"-np {counts[0] * len(placements)}" if counts[0] * len(placements) <= total else "")
        even = ",".join(f"{p.host}:{per}" for p in placements) if nproc % len(placements) == 0 else ""
        hints = " or ".join(x for x in (fix and f"pass {fix}", even and f"-H {even}") if x)
        raise ValueError(
            f"-np {nproc} over {listing} puts {', '.join(map(str, counts))} ranks on the servers; pyddl "
            f"needs the same number on each (its topology is ranks per server x servers)"
            + (f": {hints}" if hints else "; list equal slots")
        )
    return placements


def _template_fields(template: str) -> set[str]:
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as err:
        raise ValueError(f"--launcher {template!r}: {err}; use {{host}} and {{node}} only") from None
    unknown = fields - set(_PLACEHOLDERS)
    if unknown:
        raise ValueError(f"--launcher {template!r} has placeholder(s) {sorted(unknown)}; only {{host}} and {{node}} exist")
    return fields


def launcher_words(template: str, host: str, node: int) -> list[str]:
    """The launcher prefix for one server: the template with {host} and {node} filled in, or,
    when it has neither, the template followed by the host (`ssh -o BatchMode=yes -- host1`:
    `--` ends ssh's options, so no host can be read as one).

    Raises:
        ValueError: an empty template or an unknown placeholder.
    """
    if not template.strip():
        raise ValueError("--launcher is empty; give e.g. \"ssh -o BatchMode=yes\"")
    fields = _template_fields(template)
    words = shlex.split(template.format(host=host, node=node))
    if fields:
        return words
    return [*words, "--", host] if os.path.basename(words[0]) in _SHELL_LAUNCHERS else [*words, host]


def _run_line(words: list[str], line: str) -> list[str]:
    if os.path.basename(words[0]) in _SHELL_LAUNCHERS:
        return [*words, line]
    return [*words, "sh", "-c", line]


def check_command(template: str, host: str, node: int) -> list[str]:
    """The command that proves a server is reachable: the launcher running `true` there."""
    return [*launcher_words(template, host, node), "true"]


def forwarded_env(environ: Mapping[str, str], settings: Mapping[str, str]) -> dict[str, str]:
    """The variables every server's launcher gets: the PYDDL_* settings exported here (as
    horovodrun -x would forward them), then the job's own settings, which win."""
    out = {k: v for k, v in environ.items() if k.startswith("PYDDL_")}
    out.update(settings)
    return dict(sorted(out.items()))


def remote_command(
    template: str,
    placement: Placement,
    *,
    nnodes: int,
    master_addr: str,
    master_port: int,
    cwd: str,
    python: str,
    env: Mapping[str, str],
    run_args: Sequence[str],
    command: Sequence[str],
) -> list[str]:
    """Build the argv that starts `placement`'s share of the job on its server.

    The server runs `cd CWD && exec env K=V... PYTHON -u -m pyddl.cli.main run --nnodes M
    --node-rank i --master-addr A --master-port P -np SLOTS RUN_ARGS -- COMMAND` through the
    launcher; `exec` makes the launcher's process the agent itself, so a signal or a closed
    connection reaches it (python -u: output streams as it is written).

    Args:
        template: the launcher (see `launcher_words`).
        placement: the server, its node index and how many workers it runs.
        nnodes, master_addr, master_port: the static rendezvous (node 0 hosts the store).
        cwd, python: the working folder and interpreter, the same path on every server.
        env: variables set for the agent and so for its workers (PYDDL_*, GLOO_SOCKET_IFNAME).
        run_args: further `pyddl run` flags (e.g. --exit-with-stdin).
        command: the user's command.

    Returns:
        The argv to run on this machine.
    """
    assignments = [f"{k}={v}" for k, v in env.items()]
    argv = [python, "-u", "-m", "pyddl.cli.main", "run", "--nnodes", str(nnodes), "--node-rank",
            str(placement.node), "--master-addr", master_addr, "--master-port", str(master_port),
            "-np", str(placement.nproc), *run_args, "--", *command]
    line = f"cd {shlex.quote(cwd)} && exec env {shlex.join([*assignments, *argv])}"
    return _run_line(launcher_words(template, placement.host, placement.node), line)
