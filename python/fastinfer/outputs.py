"""What the engine and ``LLM.generate`` return (the shape vLLM users know)."""
from __future__ import annotations

from dataclasses import dataclass, field


class Logprob(float):
    """One token's log probability, as vLLM's ``Logprob``: ``.logprob``, ``.rank`` (1 = the most
    likely token; ties count as ahead) and ``.decoded_token`` (None without a tokenizer or with
    detokenize=False). A float subclass, so that code treating the entries as plain floats works."""
    __slots__ = ("rank", "decoded_token")

    def __new__(cls, logprob: float, rank: int | None = None, decoded_token: str | None = None):
        self = super().__new__(cls, logprob)
        self.rank, self.decoded_token = rank, decoded_token
        return self

    @property
    def logprob(self) -> float:
        return float(self)

    def __repr__(self) -> str:
        return f"Logprob(logprob={float(self)!r}, rank={self.rank!r}, decoded_token={self.decoded_token!r})"


@dataclass
class CompletionOutput:
    index: int                         # which of the request's n completions
    text: str
    token_ids: list[int]
    finish_reason: str | None          # 'stop' | 'length' | 'abort' | None while running
    stop_reason: str | int | None = None   # the stop string or stop token that ended it
    logprobs: list[dict[int, Logprob]] | None = None  # per token: sampled and top-`logprobs` ids
    cumulative_logprob: float | None = None  # sum of the sampled tokens' logprobs (with logprobs only)

    def finished(self) -> bool:  # a method, as vLLM's CompletionOutput.finished()
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    num_cached_tokens: int = 0         # prompt tokens served from the prefix cache
    # SamplingParams(prompt_logprobs=k): per prompt token, None for the first, then {token id: Logprob}
    # holding that token and the k most likely ones given the tokens before it (as vLLM); set once the
    # whole prompt is computed
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
