"""Run under the deepspeed launcher (4 ranks): two members, each sharded tp=2 on its own group,
each rank reading only its slices (runtime/distributed/loading.py). Every rank compares its
sharded member's logits with the unsharded model's and writes a report."""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from runtime.members.config import parse_config  # noqa: E402
from runtime.distributed.loading import load_shard  # noqa: E402
from runtime.distributed.world import init_world, layout_for  # noqa: E402
from runtime.members.ensemble import load_members  # noqa: E402
from runtime.members.sources import load_model  # noqa: E402

out_dir = Path(sys.argv[-1])
cfg = parse_config({"ensemble": {"main": "tiny-sp"}, "members": [
    {"name": "tiny-sp", "source": "tiny:tiny-sp", "tp_size": 2},
    {"name": "tiny-bpe", "source": "tiny:tiny-bpe", "tp_size": 2}]})
torch.set_num_threads(1)
world = init_world(layout_for(cfg), 60)
member = load_members(cfg, with_models=False, log=lambda m: None)[world.member]
reference = load_model(member.path, member.config)
sharded = load_shard(member.path, member.config, world, torch.float32)
ids = torch.randint(3, len(member.tokenizer), (2, 9), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    want = reference(ids).logits
    got = sharded(ids).logits
report = {"rank": world.rank, "member": member.name, "shape": list(got.shape),
          "max_abs_diff": float((want - got).abs().max()),
          "sharded_params": sum(p.numel() for p in sharded.parameters()),
          "full_params": sum(p.numel() for p in reference.parameters())}
(out_dir / f"rank{world.rank}.json").write_text(json.dumps(report))
torch.distributed.barrier()
