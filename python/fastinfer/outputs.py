"""What the engine and ``LLM.generate`` return (the shape vLLM users know)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int                         # which of the request's n completions
    text: str
    token_ids: list[int]
    finish_reason: str | None          # 'stop' | 'length' | 'abort' | None while running
    stop_reason: str | int | None = None   # the stop string or stop token that ended it
    logprobs: list[dict[int, float]] | None = None  # per token: sampled and top-`logprobs` ids

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    num_cached_tokens: int = 0         # prompt tokens served from the prefix cache
