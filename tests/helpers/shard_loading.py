"""Run under the deepspeed launcher (1 or 2 ranks): one member at tp = the world size, loaded
shard by shard (`sharded`, runtime/distributed/loading.py) or whole and then sharded (`full`).
Each rank saves its logits on fixed ids and writes its resident memory before loading and its
peak after (MB).

    deepspeed --num_accelerators 2 tests/helpers/shard_loading.py MODEL_DIR OUT_DIR sharded|full
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

model_dir, out_dir, how = Path(sys.argv[-3]), Path(sys.argv[-2]), sys.argv[-1]
tp = int(os.environ.get("WORLD_SIZE", "1"))
cfg = parse_config({"ensemble": {"main": "m"}, "members": [{"name": "m", "source": str(model_dir), "tp_size": tp}]})
torch.set_num_threads(1)
world = init_world(layout_for(cfg), 120)
empty_model(model_dir, cfg.members[0], torch.float32)  # the model's code imported: count what loading holds
before = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
member = cfg.members[0]
dtype = torch.float32
ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(0))
if how == "sharded":
    model = load_shard(model_dir, member, world, dtype)
else:
    model = shard_member(load_model(model_dir, member), world, dtype)
with torch.no_grad():
    got = model(ids).logits
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
torch.save(got, out_dir / f"{how}{world.rank}.pt")
(out_dir / f"{how}{world.rank}.json").write_text(json.dumps({"rank": world.rank, "rss_before_mb": before, "peak_rss_mb": peak,
    "params": sum(p.numel() for p in model.parameters()), "finite": bool(torch.isfinite(got).all())}))
torch.distributed.barrier()
