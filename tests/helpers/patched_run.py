"""launcher/run.py with one thing changed, for failures no test can cause from outside (each test
that uses it says why). The first argument after the launcher's --local_rank is the change:

    exact-ids:N            the limit on token ids that travel exactly as fp32 lowered to N (a
                           vocabulary past 2**24 tokens does not fit on a test machine)
    exit-before-shard:R    rank R exits (status 0, so the launcher does not stop the others) right
                           before it shards its member: a peer gone at that moment
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import runtime.distributed.rank as rank_module  # noqa: E402
from runtime.distributed.world import global_rank  # noqa: E402

at = next(i for i, a in enumerate(sys.argv[1:], start=1) if not a.startswith("--local_rank"))
change = sys.argv.pop(at)
what, value = change.split(":")
if what == "exact-ids":
    rank_module.EXACT_IDS = int(value)
elif what == "exit-before-shard":
    load_shard = rank_module.load_shard

    def exiting(*args, **kwargs):
        if global_rank() == int(value):
            os._exit(0)
        return load_shard(*args, **kwargs)
    rank_module.load_shard = exiting
else:
    raise SystemExit(f"unknown change {change!r}")

from launcher.run import _entry  # noqa: E402

_entry()
