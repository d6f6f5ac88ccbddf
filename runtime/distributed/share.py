"""The anchors across hosts: rank 0 finds or builds the ensemble's cache entry, and sends it to
every host whose cache lacks it, so that every leader reads the same bytes.

    rank 0            the entry in its anchors root ($DEEPEN_ANCHORS_DIR or $DEEPEN_HOME/anchors),
                      built under that root's lock if missing (runtime/members/ensemble.py)
    each host         its local rank 0 looks for the entry (by its key) in its own anchors root
    rank 0 -> hosts   the entry's files, 64 MB at a time, over a group of rank 0 and the hosts
                      that lack it (gloo; msgpack headers); written beside the target and renamed
                      into place under the host's lock

Why not let each host build its own: a build is deterministic only up to float rounding (BLAS
and devices differ between hosts), and a row fused on another leader must see the same numbers
as one process. One build and a copy costs the copy; docs/distributed.md has the figures. A
host that shares the anchors root (a network file system) finds the entry and receives nothing.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from ..members.lock import CacheLock
from .exchange import broadcast_message, gather_messages
from .startup import host_label
from .world import local_rank

CHUNK = 64 * 2**20


def _send(entry: Path, group):
    for path in sorted(p for p in entry.iterdir() if p.is_file()):
        size = path.stat().st_size
        broadcast_message({"name": path.name, "size": size}, 0, group)
        with open(path, "rb") as f:
            for start in range(0, size, CHUNK):
                data = bytearray(min(CHUNK, size - start))
                f.readinto(data)
                dist.broadcast(torch.frombuffer(data, dtype=torch.uint8), 0, group=group)
    broadcast_message({"name": None}, 0, group)


def _receive(root: Path, key: str, group, timeout: float, marker: str):
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{key}.", dir=root))
    try:
        while True:
            header = broadcast_message(None, 0, group)
            if header["name"] is None:
                break
            with open(tmp / header["name"], "wb") as f:
                for start in range(0, header["size"], CHUNK):
                    data = torch.empty(min(CHUNK, header["size"] - start), dtype=torch.uint8)
                    dist.broadcast(data, 0, group=group)
                    f.write(data.numpy())
        tmp.chmod(0o755)
        with CacheLock(root / ".locks" / "build", timeout=timeout):
            if not (root / key / marker).is_file():
                if (root / key).exists():
                    shutil.rmtree(root / key)
                os.replace(tmp, root / key)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def share_entry(key: str, root: Path, timeout: float, log=None, marker: str = "anchors.json") -> Path:
    """Collective: every rank calls it once rank 0 holds `root / key`. Returns this rank's local
    copy of the entry, sent from rank 0 to the hosts that lacked it. `marker`: the file a complete
    entry has (anchors.json; union.json for UniTE's and GaC's union maps)."""
    first = local_rank() in (0, None)
    have = (root / key / marker).is_file() if first else True
    seen = gather_messages({"have": have, "host": host_label()})
    receivers = [r for r, m in enumerate(seen) if not m["have"]]
    if receivers:
        rank = dist.get_rank()
        group = dist.new_group([0] + receivers, timeout=timedelta(seconds=timeout))
        t0 = time.perf_counter()
        if rank == 0:
            _send(root / key, group)
            if log is not None:
                size = sum(p.stat().st_size for p in (root / key).iterdir()) / 2**20
                hosts = ", ".join(seen[r]["host"] for r in receivers)
                log(f"anchors: sent {key} ({size:.0f} MB) to {hosts} in {time.perf_counter() - t0:.1f} s")
        elif rank in receivers:
            _receive(root, key, group, timeout, marker)
    dist.barrier()   # every host has the entry before any rank reads it
    return root / key


def log_line(message: str):
    print(f"deepen: {message}", file=sys.stderr, flush=True)
