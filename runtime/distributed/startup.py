"""A job's start on every rank, before its members load: what this host has to prepare, and the
ranks agreeing that every host could.

    before torch.distributed   versions; the config and the layout; on each host one process
                               (its local rank 0) prepares the members the host's ranks need
                               (runtime/members/prepare.py, under the cache's lock), while the
                               others go on to connect and wait for it there
    connect                    the default process group (runtime/distributed/world.py `connect`)
    agree                      every rank's problem, if any, gathered (msgpack); any at all and
                               every rank stops at once, rank 0 saying each in one line that names
                               the host, the member and the path or the command to run

A rank never stops on its own before `agree`: the other hosts would wait for it at the
rendezvous until the start-up timeout. transformers writes checkpoints only on global rank 0
once torch.distributed is initialised, so nothing is prepared after `connect`."""
from __future__ import annotations

import os
import socket
import sys
import threading
import time

import torch
import torch.distributed as dist

from ..members.config import ConfigError, load_config
from ..members.prepare import member_dir
from ..members.sources import MemberError, deepen_home
from ..versions import check_versions
from .world import LayoutError, check_world, connect, global_rank, layout_for, local_rank, local_world_size

dying = threading.Lock()   # held by the one thread that says why this rank stops


def die(who: str, error: BaseException | str, code: int = 1, linger: float = 0.0):
    """Say who failed and why, then exit at once (`linger`: seconds to stay up first, for rank 0,
    whose store the others read to name the failed rank themselves)."""
    sys.stderr.write(f"deepen: {who}: {error}\n")
    sys.stderr.flush()
    time.sleep(linger)
    os._exit(code)  # never hang in atexit handlers or collectives


def stop_all(lines: list[str], code: int = 2):
    """Every rank stops on a verdict they all hold: rank 0 says each line once, the others go
    quietly (and a SIGTERM from the launcher meanwhile adds nothing)."""
    dying.acquire(blocking=False)
    if not dist.is_initialized() or dist.get_rank() == 0:
        sys.stderr.write("".join(f"deepen: {line}\n" for line in lines))
        sys.stderr.flush()
    os._exit(code)


def node_index() -> int | None:
    """This host's index in the job, from the launcher (deepspeed, torchrun, SLURM)."""
    for key in ("CROSS_RANK", "GROUP_RANK", "SLURM_NODEID"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return None


def host_label() -> str:
    """`node 1 (gpu-b7)`: the index tells apart "hosts" that share a machine (tests)."""
    node = node_index()
    return f"node {node} ({socket.gethostname()})" if node is not None else socket.gethostname()


def world_size() -> int | None:
    for key in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return None


def host_ranks() -> list[int]:
    """The global ranks on this host: launchers number a host's ranks consecutively."""
    rank, local = global_rank(), local_rank()
    if local is None:
        return [rank]
    return list(range(rank - local, rank - local + local_world_size()))


def members_needed(layout, ranks: list[int], size: int | None) -> set[int]:
    """The members whose files these ranks read: their own and the main member's (its tokenizer
    decodes), every member's on a replica's root (tokenizers, fingerprints)."""
    replicas = 1
    if size is not None:
        try:
            replicas = check_world(layout, size)
        except LayoutError:
            replicas = 1   # `agree` reports the world size; prepare what one replica needs
    needed = set()
    for r in ranks:
        if r >= layout.size * replicas:
            continue
        needed |= set(range(len(layout.names))) if r % layout.size == 0 else {0, layout.member_of(r)}
    return needed


def prepare_here(config_path: str, timeout: float, packages=("transformers", "deepspeed")):
    """(config, layout, problem): everything a rank does before torch.distributed. `problem` is
    one line or None; this host's local rank 0 prepares the host's members."""
    warn = lambda m: print(f"deepen: {host_label()}: {m}", file=sys.stderr, flush=True)  # noqa: E731
    problem = check_versions(packages, warn=warn)
    if problem:
        return None, None, f"{host_label()}: {problem}"
    try:
        cfg = load_config(config_path, check_sources=False)   # a source missing on one host is `agree`'s
        layout = layout_for(cfg)
    except (ConfigError, ValueError) as e:
        return None, None, f"{host_label()}: {e}"
    if local_rank() not in (0, None):
        return cfg, layout, None
    home = deepen_home()
    members = cfg.ordered_members
    for i in sorted(members_needed(layout, host_ranks(), world_size())):
        try:
            path = member_dir(members[i], home, log=warn, lock_timeout=timeout)
            check_full_loading(members[i], path, sum(layout.member_of(r) == i for r in host_ranks()
                                                     if r < layout.world_size))
        except (MemberError, ValueError, OSError, TimeoutError) as e:
            return cfg, layout, f"{host_label()}: {e}"
    return cfg, layout, None


def weights_bytes(model_dir, dtype: torch.dtype) -> int:
    """What the member's weights take in `dtype` once loaded (safetensors headers; pickle files
    by size)."""
    from .loading import DTYPES, SafetensorsFile
    total = 0
    for path in model_dir.glob("*.safetensors"):
        f = SafetensorsFile(path)
        try:
            for key in f.keys():
                meta = f.header[key]
                n = 1
                for d in meta["shape"]:
                    n *= d
                stored = DTYPES[meta["dtype"]]
                total += n * (dtype.itemsize if stored.is_floating_point else stored.itemsize)
        finally:
            f.close()
    total += sum(p.stat().st_size for p in model_dir.iterdir() if p.suffix in (".bin", ".pth", ".pt"))
    return total


def host_memory() -> int:
    """Bytes this host can give a job now: available memory, within a cgroup's limit."""
    import psutil
    free = psutil.virtual_memory().available
    for path, used in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                       ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit, now = open(path).read().strip(), int(open(used).read())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:
            free = min(free, int(limit) - now)
    return free


def check_full_loading(member, model_dir, ranks_here: int, available: int | None = None):
    """`loading = "full"` reads the whole model on every rank of the member before sharding it:
    refused (ValueError) when this host's ranks of it would need more memory than it has."""
    if member.loading != "full" or ranks_here < 1:
        return
    need = weights_bytes(model_dir, getattr(torch, member.dtype)) * ranks_here
    available = host_memory() if available is None else available
    if need > available:
        gb = lambda b: f"{b / 2**30:.1f} GB"  # noqa: E731
        raise ValueError(f"member {member.name!r}: loading = \"full\" reads the whole model ({gb(need / ranks_here)} "
                         f"in {member.dtype}) on each of its {ranks_here} ranks here, {gb(need)} in all, but this host "
                         f"has {gb(available)} available: use loading = \"sharded\" (each rank reads only its slices)")


def agree(problem: str | None) -> None:
    """Every rank's start-up problem, on every rank (each rank calls this once). If there is any,
    rank 0 says each once and every rank stops (exit status 2); else nothing happens."""
    from .exchange import gather_messages
    seen = gather_messages({"problem": problem})
    problems = list(dict.fromkeys(m["problem"] for m in seen if m["problem"]))
    if problems:
        stop_all(problems)


def begin(config_path: str, timeout: float):
    """(config, layout, device): this host prepared, this rank connected. Imports neither
    transformers nor DeepSpeed, so a host where either is missing or too old still tells every
    rank, through `agree`, and all stop. A rank with no problem here calls `agree` later, once it
    has read its members (runtime/distributed/rank.py)."""
    cfg, layout, problem = prepare_here(config_path, timeout)
    try:
        device = connect(timeout)
    except Exception as e:  # noqa: BLE001 - no world to tell: say it here
        die(f"rank {global_rank()} on {host_label()}", f"cannot join the job: {type(e).__name__}: {e}")
    if problem is None and dist.is_initialized():
        try:
            check_world(layout, dist.get_world_size())
        except LayoutError as e:
            problem = str(e)
    if problem is not None:
        if dist.is_initialized():
            agree(problem)
        die(f"rank {global_rank()}", problem, 2)   # a launcher that sets no RANK/WORLD_SIZE: nobody to tell
    return cfg, layout, device
