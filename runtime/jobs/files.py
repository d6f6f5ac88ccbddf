"""JSON-lines in, JSON-lines out, for batch jobs that must survive interruption.

Input: one object per line, `{"id": ..., "prompt": "..."}` plus optional `max_new_tokens`,
`stop` (a string or a list of strings), the sampling fields `temperature`, `top_p`, `top_k`,
`seed`, `n` and `logprobs` (engine/sampling.py; each overrides the job's option), and any other
fields, which are carried through to the result. A request with `n` > 1 becomes n requests with
ids `<id>#<k>` (k = 0..n-1, also in the field `sample`), each with its own seed. The whole input is read and checked before any work starts, so a malformed line stops
the job (naming its line number) before anything is computed, or is skipped with `skip_bad`.

Output: one result per line, appended the moment its row finishes, with a single write of the
whole line, and flushed to disk. `resume` skips ids already in the output; a torn last line
(the job was killed mid-write) is cut off first, so nothing is duplicated and nothing lost.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..engine.sampling import GREEDY, SamplingParams, stable_seed
from ..engine.sequence import Request

SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "seed", "n", "logprobs")
RESERVED = ("id", "prompt", "max_new_tokens", "stop", *SAMPLING_FIELDS)


class InputError(ValueError):
    pass


def parse_request(obj, where: str, default_max: int, default_stop: tuple[str, ...],
                  sampling: SamplingParams = GREEDY) -> Request:
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "id" not in obj:
        raise InputError(f"{where}: missing field 'id'")
    if not isinstance(obj["id"], (str, int)) or isinstance(obj["id"], bool):
        raise InputError(f"{where}: field 'id' must be a string or an integer")
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise InputError(f"{where}: field 'prompt' must be a non-empty string")
    max_new = obj.get("max_new_tokens", default_max)
    if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 1:
        raise InputError(f"{where}: field 'max_new_tokens' must be a positive integer")
    stop = obj.get("stop", list(default_stop))
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise InputError(f"{where}: field 'stop' must be a non-empty string or a list of them")
    extra = {k: v for k, v in obj.items() if k not in RESERVED}
    own = {k: obj[k] for k in SAMPLING_FIELDS if k in obj}
    if own:
        try:
            sampling = SamplingParams(**{**sampling.pack(), **own}).check()
        except ValueError as e:
            raise InputError(f"{where}: {e}") from None
    return Request(obj["id"], prompt, max_new, tuple(stop), extra, sampling)


def expand_samples(request: Request, job_seed: int = 0) -> list[Request]:
    """A sampled request with its seed made concrete (its own, or from the job's seed and its
    id); with n > 1, n requests, ids <id>#<k>, each seeded from that seed and k. A sample is then
    the same whatever else runs with it, and after a resume."""
    params = request.sampling
    if params.greedy:
        return [request]
    base = params.seed if params.seed is not None else stable_seed(job_seed, request.id)
    if params.n == 1:
        return [Request(request.id, request.prompt, request.max_new_tokens, request.stop, request.extra,
                        SamplingParams(**{**params.pack(), "seed": base}))]
    return [Request(f"{request.id}#{k}", request.prompt, request.max_new_tokens, request.stop,
                    {**request.extra, "sample": k},
                    SamplingParams(**{**params.pack(), "n": 1, "seed": stable_seed(base, k)}))
            for k in range(params.n)]


def read_jsonl(path: str | Path, numbered: bool = False) -> list:
    """The objects of a JSON-lines file (blank lines skipped); `numbered`: (line number, object).
    Lines end at "\n" only: str.splitlines() also breaks at U+2028, U+0085 and friends, which
    json.dumps(ensure_ascii=False) leaves raw inside a generated text."""
    rows = []
    with open(path, encoding="utf-8", newline="\n") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not valid JSON: {e.msg}") from None
            rows.append((number, obj) if numbered else obj)
    return rows


def read_requests(path: str | Path, default_max: int = 64, default_stop: tuple[str, ...] = (),
                  skip_bad: bool = False, warn=print, sampling: SamplingParams = GREEDY,
                  seed: int = 0) -> list[Request]:
    requests, seen = [], {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
                request = parse_request(obj, where, default_max, default_stop, sampling)
                if request.id in seen:
                    raise InputError(f"{where}: duplicate id {request.id!r} (first on line {seen[request.id]})")
            except InputError as e:
                if not skip_bad:
                    raise
                warn(f"skipped: {e}")
                continue
            seen[request.id] = number
            requests.extend(expand_samples(request, seed))
    return requests


def finished_ids(path: str | Path) -> set:
    """Ids already in an output file; a torn last line is cut off (it was never complete)."""
    path = Path(path)
    if not path.exists():
        return set()
    data = path.read_bytes()
    good = data.rfind(b"\n") + 1
    if good < len(data):
        with open(path, "r+b") as f:
            f.truncate(good)
    ids = set()
    # split on "\n" only: str.splitlines() also breaks at U+2028, U+0085 and friends, which
    # json.dumps(ensure_ascii=False) leaves raw inside a generated text
    for number, line in enumerate(data[:good].decode("utf-8").split("\n"), start=1):
        if line.strip():
            try:
                ids.add(json.loads(line)["id"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise InputError(f"{path}:{number}: not a result line; refusing to resume into it") from None
    return ids


def pending_requests(input_path, output_path, resume: bool, overwrite: bool, default_max: int = 64,
                     default_stop: tuple[str, ...] = (), skip_bad: bool = False, warn=print,
                     sampling: SamplingParams = GREEDY, seed: int = 0):
    """A generate job's work: every request of `input_path` (checked before anything runs) less
    the ids `output_path` already holds with `resume`. An existing output is never replaced
    silently. Returns (requests to run, number already done)."""
    if resume and overwrite:
        raise InputError("--resume and --overwrite exclude each other")
    requests = read_requests(input_path, default_max, default_stop, skip_bad, warn, sampling, seed)
    if Path(output_path).exists() and not (resume or overwrite):
        raise FileExistsError(f"{output_path} exists: pass --resume to finish it, or --overwrite to replace it")
    done = finished_ids(output_path) if resume else set()
    return [r for r in requests if r.id not in done], len(done)


class ResultWriter:
    """Appends one JSON line per result: one write() of the whole line, then fsync."""

    def __init__(self, path: str | Path, append: bool):
        path = Path(path)
        if path.parent:
            path.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
        self.fd = os.open(path, flags, 0o644)
        if not append:
            os.close(self.fd)
            self.fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        self.count = 0

    def write(self, record: dict):
        os.write(self.fd, (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        os.fsync(self.fd)
        self.count += 1

    def close(self):
        os.close(self.fd)
