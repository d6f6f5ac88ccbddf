"""Hostfiles (`host slots=N`, DeepSpeed's format) and where a config's ranks land on them.

The deepspeed launcher numbers ranks host by host, in hostfile order, slot by slot; ranks are
assigned to members main first (runtime/distributed/world.py). A member's tensor-parallel group
must sit on one host: its all-reduces run every layer, and across nodes they would be slow."""
from __future__ import annotations

import re
from pathlib import Path

from .world import Layout, LayoutError

_LINE = re.compile(r"^(\S+)\s+slots\s*=\s*(\d+)\s*$")


def read_hostfile(path: str | Path) -> list[tuple[str, int]]:
    """[(host, slots)] in file order; comments (#) and blank lines skipped."""
    hosts = []
    for number, raw in enumerate(Path(path).read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = _LINE.match(line)
        if not m or int(m.group(2)) < 1:
            raise LayoutError(f"{path}:{number}: expected 'HOST slots=N' with N >= 1, got {raw.strip()!r}")
        if any(h == m.group(1) for h, _ in hosts):
            raise LayoutError(f"{path}:{number}: host {m.group(1)!r} is listed twice")
        hosts.append((m.group(1), int(m.group(2))))
    if not hosts:
        raise LayoutError(f"{path}: no hosts")
    return hosts


def place(layout: Layout, hosts: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """Each rank's (host, local slot). Errors name the member whose group straddles hosts."""
    slots = [(host, i) for host, n in hosts for i in range(n)]
    if layout.world_size > len(slots):
        raise LayoutError(f"the config needs {layout.world_size} ranks but the hostfile has {len(slots)} slots")
    placed = slots[:layout.world_size]
    for replica in range(layout.replicas):
        for name, ranks in zip(layout.names, layout.for_replica(replica).ranks):
            spread = sorted({placed[r][0] for r in ranks})
            if len(spread) > 1:
                raise LayoutError(f"member {name!r} (ranks {ranks[0]}-{ranks[-1]}) straddles hosts {', '.join(spread)}: "
                                  "reorder the members or change tp_size so that each group fits one host")
    return placed


def describe_placement(layout: Layout, placed: list[tuple[str, int]]) -> str:
    lines = ["| rank | replica | member | role | host | slot |", "|---|---|---|---|---|---|"]
    for rank, (host, slot) in enumerate(placed):
        i = layout.member_of(rank)
        ranks = layout.for_replica(rank // layout.size).ranks[i]
        role = "leader" if rank == ranks[0] else f"tp rank {ranks.index(rank)}"
        lines.append(f"| {rank} | {rank // layout.size} | {layout.names[i]} | {role} | {host} | {slot} |")
    return "\n".join(lines)
