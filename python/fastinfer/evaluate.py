"""Perplexity of a model on a token sequence, in non-overlapping windows (each starts fresh)."""
from __future__ import annotations

import math

import torch

from .metadata import SeqChunk
from .runner import ModelRunner


def window_nll(runner: ModelRunner, window: list[int]) -> tuple[float, int]:
    """Sum of -log p(token | preceding tokens of the window) and the number of tokens predicted."""
    blocks = -(-len(window) // runner.block_size)
    logits = runner.run([SeqChunk(window, 0, list(range(blocks)), all_logits=True)])  # [len, vocab] fp32
    logprobs = torch.log_softmax(logits[:-1], dim=-1)
    targets = torch.tensor(window[1:], device=logprobs.device)
    return float(-logprobs.gather(1, targets[:, None]).sum()), len(window) - 1


def perplexity(model, token_ids: list[int], window: int = 512, kv_cache_dtype: str = "auto") -> float:
    """exp(mean NLL) over windows of `window` tokens; `model` is anything fastinfer.generate accepts
    (a LoadedModel too, e.g. one loaded with quantization="fp8")."""
    from .generate import get_loaded
    if window < 2 or len(token_ids) < 2:
        raise ValueError(f"perplexity needs window >= 2 and >= 2 tokens, got window={window}, {len(token_ids)} tokens")
    loaded = get_loaded(model)
    runner = ModelRunner(loaded.model, num_blocks=-(-window // 16), block_size=16, kv_cache_dtype=kv_cache_dtype)
    total, count = 0.0, 0
    for start in range(0, len(token_ids) - 1, window):
        chunk = token_ids[start:start + window]
        if len(chunk) < 2:
            break
        nll, n = window_nll(runner, chunk)
        total, count = total + nll, count + n
    return math.exp(total / count)
