"""`deepen generate`'s job in one process: decode requests into a JSON-lines file, one line
the moment each row finishes, with progress; an interruption keeps every line written."""
from __future__ import annotations

import json
import time
from pathlib import Path

from .files import ResultWriter
from .progress import Progress, peak_rss_mb


class Interrupted(Exception):
    def __init__(self, written: int):
        super().__init__(f"interrupted: {written} new results were written")
        self.written = written


def generate_file(ensemble, requests, output_path, append: bool, batch: int = 8,
                  progress: bool = True, stats_path=None) -> tuple[list, dict]:
    """Decode `requests` with `ensemble` (runtime.api.Ensemble) into `output_path`. Returns
    (results, figures: seconds, tokens, tokens/s, steps, fused rows, neglected mass, breakdown).
    `stats_path`: also write the figures there as JSON (the format `launcher/run.py --stats`
    writes for rank 0). Raises Interrupted on Ctrl-C, after closing the file."""
    writer = ResultWriter(output_path, append=append)
    bar = Progress(len(requests), "generate", "prompts", progress)
    tokens = 0
    t0 = time.perf_counter()

    def on_result(result):
        nonlocal tokens
        writer.write(result.record())
        tokens += len(result.ids)
        bar.update(1, f"{tokens / max(time.perf_counter() - t0, 1e-9):.1f} tok/s")

    try:
        results = ensemble.run(requests, batch, on_result)
    except KeyboardInterrupt:
        raise Interrupted(writer.count) from None
    finally:
        bar.close()
        writer.close()
    seconds = time.perf_counter() - t0
    figures = ensemble.last_engine.report(seconds, tokens)
    figures.update({"rank": 0, "world_size": 1, "peak_rss_mb": peak_rss_mb()})
    if stats_path:
        Path(stats_path).write_text(json.dumps(figures, indent=1))
    return results, figures
