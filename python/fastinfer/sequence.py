"""A sequence in the engine: its tokens, how many are cached, its blocks, its sampling state."""
from __future__ import annotations

import enum
import itertools

from typing import TYPE_CHECKING

from .sampling_params import SamplingParams

if TYPE_CHECKING:
    from .sampling import TokenStream


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


class Sequence:
    """One completion of one request. ``n > 1`` requests fork into several after their prefill."""

    def __init__(self, request_id: str, index: int, prompt_token_ids: list[int], params: SamplingParams,
                 generator: TokenStream | None, arrival: int, extra_seen_ids: tuple[int, ...] = ()):
        self.seq_id = next(_ids)
        self.request_id = request_id
        self.index = index                      # which of the request's n completions
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.params = params
        self.generator = generator             # seeded: randomness keyed by output position (sampling.TokenStream)
        self.arrival = arrival                  # admission order: preemption takes the newest first
        self.extra_seen_ids = extra_seen_ids    # counted by the repetition penalty (HF's masked-out prompt tokens)
        self.ngram_history: list[int] | None = None  # no_repeat_ngram_size's prompt (HF's padded row), else the prompt
        self.guide = None                       # structured outputs: its structured.TokenGuide
        self.guide_state: int | None = None     # ... the state after output_token_ids[:guide_pos] (None: initial)
        self.guide_pos = 0
        self.status = SeqStatus.WAITING
        self.block_table: list[int] = []
        self.num_computed_tokens = 0            # tokens whose KV is in the cache
        self.draft_computed = 0                 # ... in the draft model's cache (speculative decoding)
        self.num_hashed_blocks = 0              # leading full blocks registered for prefix reuse
        self.num_released_blocks = 0            # leading entries released below a sliding window (block_manager.py)
        self.block_hashes: list[int] = []
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.text = ""                          # detokenized output (engine with a tokenizer)
        self.prefix_offset = self.read_offset = 0  # incremental detokenization window (Detokenizer)
        self.logprobs: list[dict[int, float]] | None = [] if params.logprobs is not None else None
        # prompt position -> {token id: Logprob} (SamplingParams.prompt_logprobs; positions 1 .. len - 1)
        self.prompt_logprobs: dict[int, dict] | None = {} if params.prompt_logprobs is not None else None
        self.cumulative_logprob: float | None = 0.0 if params.logprobs is not None else None
        self.num_prefix_hit_tokens = 0         # prompt tokens served from the prefix cache at first admission
        self.admitted = False                   # allocated blocks at least once (a later allocation is a recompute)
        self.forked = False                     # True once an n > 1 request has split into n sequences
        # LongRoPE (metadata.rope_rows): the length whose one-forward prefill HF's rotary choice sees for the
        # cached tokens, the prompt's; a Phi-3 sequence crossing original_max_position_embeddings is
        # recomputed whole with the long factors, as HF's Phi-3 generate does, and this becomes its length then
        self.rope_prompt_len = len(self.prompt_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, stop: int) -> list[int]:
        """all_token_ids[start:stop] without building the whole list (a decode step needs one token)."""
        p = len(self.prompt_token_ids)
        if start >= p:
            return self.output_token_ids[start - p:stop - p]
        return self.prompt_token_ids[start:stop] + self.output_token_ids[:max(0, stop - p)]

    def __len__(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Prompt logprobs asked for and not all computed: its prompt chunks need every row's logits."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt_token_ids) - 1

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    def num_blocks_for(self, num_tokens: int, block_size: int) -> int:
        return -(-num_tokens // block_size)

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id}#{self.index}, len={len(self)}, computed={self.num_computed_tokens}, "
                f"{self.status.value})")
