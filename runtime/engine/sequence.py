"""What the engine decodes: a request, the running state of its row, and its result."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from .detokenize import Text
from .sampling import GREEDY, SamplingParams


@dataclass
class Request:
    id: object
    prompt: str
    max_new_tokens: int = 64
    stop: tuple[str, ...] = ()
    extra: dict = field(default_factory=dict)   # carried through to the result record
    sampling: SamplingParams = GREEDY

    def pack(self) -> list:
        """For a control message (msgpack)."""
        return [self.id, self.prompt, self.max_new_tokens, list(self.stop), self.extra, self.sampling.pack()]

    @classmethod
    def unpack(cls, data: list) -> "Request":
        i, prompt, n, stop, extra, sampling = data
        return cls(i, prompt, n, tuple(stop), extra, SamplingParams(**sampling))


@dataclass
class Row:
    """A request in a slot: the main member's ids emitted so far and the committed text."""
    request: Request
    ids: list[int] = field(default_factory=list)
    text: str = ""
    decoded: Text = field(default_factory=Text)   # the text's decode window (engine/detokenize.py)
    fused_steps: int = 0
    admitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    seed: int = 0                     # the draws' seed (engine/sampling.py)
    logprobs: list = field(default_factory=list)   # per emitted token, when asked for


@dataclass
class Result:
    request: Request
    text: str
    ids: list[int]
    finish: str                       # eos | stop | length
    member_tokens: dict[str, int]
    fused_steps: int
    first_token_s: float | None = None  # from admission to the first committed token
    logprobs: list | None = None      # per token: {"token", "text", "logprob", "main_logprob", "top"}

    def record(self) -> dict:
        """The JSON line of a result (the request's extra fields first)."""
        return {**self.request.extra, "id": self.request.id, "completion": self.text,
                "tokens": len(self.ids), "finish_reason": self.finish,
                "member_tokens": self.member_tokens, "fused_steps": self.fused_steps,
                **({"logprobs": self.logprobs} if self.logprobs is not None else {})}
