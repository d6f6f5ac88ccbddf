"""Run under the deepspeed launcher: several members in one world, each on its own group of ranks
(in the order given), each loaded shard by shard (`sharded`, runtime/distributed/loading.py) or
whole and then sharded (`full`). Every rank saves its member's logits on fixed ids and writes its
resident memory before loading and its peak after (MB), and its member's parameter count.

    deepspeed --num_accelerators 6 tests/helpers/shard_loading.py OUT_DIR NAME=MODEL_DIR:HOW:TP ...
    (the TPs add up to the world size; NAME names the member and its files, OUT_DIR/NAME<rank>.json)
"""
import json
import os
import resource
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from runtime.distributed.loading import empty_model, load_shard  # noqa: E402
from runtime.distributed.world import init_world, layout_for, shard_member  # noqa: E402
from runtime.members.config import parse_config  # noqa: E402
from runtime.members.sources import load_model  # noqa: E402

args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
out_dir, specs = Path(args[0]), [a.split("=", 1) for a in args[1:]]
members = [{"name": name, "source": spec.split(":")[0], "tp_size": int(spec.split(":")[2])} for name, spec in specs]
how = {name: spec.split(":")[1] for name, spec in specs}
cfg = parse_config({"ensemble": {"main": members[0]["name"]}, "members": members})
torch.set_num_threads(1)
world = init_world(layout_for(cfg), 300)
member = cfg.ordered_members[world.member]
model_dir, dtype = Path(member.source), torch.float32
empty_model(model_dir, member, dtype)  # the model's code imported: count what loading holds
before = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(0))
if how[member.name] == "sharded":
    model = load_shard(model_dir, member, world, dtype)
else:
    model = shard_member(load_model(model_dir, member), world, dtype)
with torch.no_grad():
    got = model(ids).logits
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
torch.save(got, out_dir / f"{member.name}{world.rank}.pt")
(out_dir / f"{member.name}{world.rank}.json").write_text(json.dumps({
    "rank": world.rank, "member": member.name, "how": how[member.name], "tp": member.tp_size,
    "rss_before_mb": before, "peak_rss_mb": peak, "params": sum(p.numel() for p in model.parameters()),
    "finite": bool(torch.isfinite(got).all())}))
torch.distributed.barrier()
