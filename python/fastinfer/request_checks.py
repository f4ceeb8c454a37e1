"""A submitted request's checks and tokenization, and the structures it is queued with (engine.py's add_request).

Functions of the values they check (the engine passes its current ones): nothing here holds state."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator

import torch

from .sampling import make_stream
from .sampling_params import SamplingParams
from .sequence import Sequence


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]


def tokenize_prompt(tokenizer, prompt: str | list[int]) -> list[int]:
    """A text prompt's token ids (it needs a tokenizer), or a copy of the token ids given."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer; this model has none, pass token ids")
        return tokenizer(prompt)["input_ids"]
    if not isinstance(prompt, (list, tuple)):
        raise ValueError(f"prompt must be a str or a list of token ids, got {type(prompt).__name__}")
    return list(prompt)


def bad_words_token_ids(tokenizer, words: list[str]) -> list[list[int]]:
    """vLLM's tokenization of SamplingParams.bad_words: each word (leading spaces stripped) without special
    tokens, and " " + word too when that starts with a different token and has as many tokens (a word
    inside the text, where tokenizers fold the space into the word's first token)."""
    if tokenizer is None:
        raise ValueError("bad_words need a tokenizer (they are words); this model has none: give LLM(..., "
                         "tokenizer=...) or ban token sequences with bad_words_ids")

    def encode(text: str) -> list[int]:
        try:
            return list(tokenizer(text, add_special_tokens=False)["input_ids"])
        except TypeError:  # a tokenizer object without that keyword
            return list(tokenizer(text)["input_ids"])
    ids = []
    for word in words:
        plain = encode(word.lstrip())
        if not plain:
            raise ValueError(f"bad_words: {word!r} tokenizes to no tokens")
        ids.append(plain)
        spaced = encode(" " + word.lstrip())
        if spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
            ids.append(spaced)
    return ids


def tokenize_bad_words(params: SamplingParams, tokenizer) -> SamplingParams:
    """params with vLLM's bad_words tokenized into _bad_words_token_ids (the engine matches them against the
    output); params itself without bad_words."""
    if not params.bad_words:
        return params
    return replace(params, _bad_words_token_ids=bad_words_token_ids(tokenizer, params.bad_words))


def validate_request(token_ids: list[int], params: SamplingParams, *, vocab_size: int, max_model_len: int,
                     block_size: int, num_blocks: int, tokenizer, window: int = 0, step_tokens: int = 0) -> None:
    """ValueError unless the prompt's ids are in the vocabulary and the request fits the model's length,
    the KV pool and what the model can do (logprobs within the vocabulary, stop strings with a tokenizer).
    window > 0 (the block manager releases blocks below a sliding window): a sequence holds at most the
    blocks of window + RELEASE_ALIGN + step_tokens (the most tokens one step computes for it) keys."""
    if not token_ids:
        raise ValueError("prompt is empty")
    bad = next((t for t in token_ids if not isinstance(t, int) or not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ValueError(f"prompt has token id {bad!r} outside the vocabulary [0, {vocab_size})")
    total = len(token_ids) + (params.max_tokens or 0)
    if len(token_ids) >= max_model_len or total > max_model_len:
        raise ValueError(f"prompt ({len(token_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                         f"max_model_len={max_model_len}")
    need = -(-max(total, len(token_ids) + 1) // block_size)
    if window:
        from .block_manager import RELEASE_ALIGN
        need = min(need, -(-(window + RELEASE_ALIGN + step_tokens) // block_size) + 1)
    if need > num_blocks:
        raise ValueError(f"the request needs {need} KV blocks at its longest but the pool holds "
                         f"{num_blocks}; raise num_blocks or lower max_tokens")
    if params.logprobs is not None and params.logprobs > vocab_size:
        raise ValueError(f"logprobs must be <= the vocabulary size {vocab_size}, got {params.logprobs}")
    bad_word_ids = [t for w in params.bad_words_ids or () for t in w]
    bad_word_tokens = [t for w in params._bad_words_token_ids or () for t in w]
    for name, ids in (("logit_bias", params.logit_bias or ()), ("allowed_token_ids", params.allowed_token_ids or ()),
                      ("bad_words_ids", bad_word_ids), ("bad_words (as tokenized)", bad_word_tokens)):
        bad = [i for i in ids if i >= vocab_size]
        if bad:
            raise ValueError(f"{name} has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")
    if params.prompt_logprobs is not None and params.prompt_logprobs > vocab_size:
        raise ValueError(f"prompt_logprobs must be <= the vocabulary size {vocab_size}, got {params.prompt_logprobs}")
    if params.structured_outputs is not None and tokenizer is None:
        raise ValueError("structured_outputs need a tokenizer (the constraint is on the text); this model has none: "
                         "give LLM(..., tokenizer=...)")
    if params.stop and tokenizer is None:
        raise ValueError("stop strings need a tokenizer to match text; this model has none "
                         "(use stop_token_ids)")


def check_params(params: SamplingParams | None, *, speculative: bool) -> SamplingParams:
    """The request's params (the defaults for None), checked before its prompt is tokenized."""
    params = SamplingParams() if params is None else params
    if not isinstance(params, SamplingParams):
        raise ValueError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
    if speculative and params.logprobs is not None:
        raise ValueError("logprobs are not supported with speculative decoding")
    if speculative and params.no_repeat_ngram_size:
        raise ValueError("no_repeat_ngram_size is not supported with speculative decoding")
    if speculative and (params.bad_words_ids or params.bad_words):
        raise ValueError(f"{'bad_words_ids' if params.bad_words_ids else 'bad_words'} is not supported with "
                         f"speculative decoding")
    if speculative and params.structured_outputs is not None:
        raise ValueError("structured_outputs are not supported with speculative decoding")
    if params.structured_outputs is not None:
        if params.min_tokens:
            raise ValueError("min_tokens is not supported with structured_outputs (the structure decides where the "
                             "output may end)")
        # each could forbid every token the structure allows at some point (the row would have no token)
        for name, conflict in (("allowed_token_ids", params.allowed_token_ids is not None),
                               ("bad_words_ids", bool(params.bad_words_ids)), ("bad_words", bool(params.bad_words)),
                               ("logit_bias with -inf", any(b == float("-inf") for b in (params.logit_bias or {}).values()))):
            if conflict:
                raise ValueError(f"{name} is not supported with structured_outputs (put the restriction in the "
                                 f"constraint instead)")
    return params


def fill_max_tokens(token_ids: list[int], params: SamplingParams, max_model_len: int) -> SamplingParams:
    """A copy of params with max_tokens filled in (when None: the room left after the prompt)."""
    if params.max_tokens is None:
        room = max_model_len - len(token_ids)
        if params.min_tokens > room > 0:
            raise ValueError(f"min_tokens={params.min_tokens} exceeds the {room} tokens left after the "
                             f"prompt ({len(token_ids)} tokens) within max_model_len={max_model_len}")
        return replace(params, max_tokens=max(1, room))
    return replace(params)  # checked again: a SamplingParams may have been changed after construction


def new_request(request_id: str, prompt: str | list[int], token_ids: list[int], params: SamplingParams,
                device: torch.device, arrivals: Iterator[int], extra_seen_ids: tuple[int, ...],
                ngram_history: list[int] | None = None) -> _Request:
    """A checked request with its first sequence (n > 1 forks the others once its prompt is computed)."""
    gen = make_stream(params.seed, device)
    seq = Sequence(request_id, 0, token_ids, params, gen, next(arrivals), extra_seen_ids)
    seq.ngram_history = ngram_history
    return _Request(request_id, prompt if isinstance(prompt, str) else None, token_ids, params, [seq])


def refuse_vllm_request_args(lora_request, priority) -> None:
    """vLLM's LLM.generate arguments fastinfer does not implement, refused by name instead of ignored."""
    if lora_request is not None:
        raise ValueError("lora_request: per-request LoRA adapters are not supported; load the adapter with "
                         "peft.PeftModel.from_pretrained(base, adapter) and pass that model to LLM (merged)")
    if priority is not None:
        raise ValueError("priority: priority scheduling is not supported (requests are served first come, first "
                         "served)")


def check_vllm_engine_args(seed, enable_chunked_prefill, swap_space, disable_log_stats, tokenizer_mode) -> None:
    """vLLM LLM() arguments a ported script passes, checked: seed (LLM seeds torch's generators with it once built,
    as vLLM seeds its global state: the random draws of requests without their own seed); prefill is always chunked
    (enable_chunked_prefill=False is refused); swap_space is accepted with no effect (a preempted sequence is
    recomputed, never swapped to host memory); disable_log_stats has no effect (fastinfer logs no stats);
    tokenizer_mode "auto" only."""
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ValueError(f"seed must be an integer or None, got {seed!r}")
    if enable_chunked_prefill is not None and enable_chunked_prefill is not True:
        raise ValueError(f"enable_chunked_prefill={enable_chunked_prefill!r}: fastinfer always chunks prefill "
                         f"(max_num_batched_tokens per step); only True or None")
    if swap_space is not None and (isinstance(swap_space, bool) or not isinstance(swap_space, (int, float))
                                   or swap_space < 0):
        raise ValueError(f"swap_space must be a non-negative number of GiB, got {swap_space!r}")
    if not isinstance(disable_log_stats, bool):
        raise ValueError(f"disable_log_stats must be a bool, got {disable_log_stats!r}")
    if tokenizer_mode != "auto":
        raise ValueError(f"tokenizer_mode={tokenizer_mode!r}: only 'auto' (the checkpoint's tokenizer, or tokenizer=)")
