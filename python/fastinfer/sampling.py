"""fp32 sampler: logits processors (mirroring HF transformers) and token draws.

Processor order, as in transformers' `GenerationMixin._get_logits_processor`:
repetition penalty -> presence/frequency penalties -> suppression (min_tokens EOS)
-> temperature -> top-k -> top-p -> min-p. Greedy rows get only the first three.
Each processor works on the whole batch with per-row parameters; a row for which a
processor is disabled gets a parameter value that makes it a no-op, so no row is
ever selected with a host-side mask.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from itertools import chain

import torch

from .sampling_params import SamplingParams, kTinyTemperature

kNegInf = float("-inf")
# exponential_ may return exactly 0; the clamp keeps masked tokens (prob 0) at score 0
# instead of 0 / 0 = NaN, which argmax would pick.
kMinExponential = 1e-10


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A torch.Generator on `device` seeded with `seed`, or None when seed is None."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


_MASK64 = 2**64 - 1


def _splitmix64(x: int) -> int:
    """SplitMix64's finalizer: a bijection of 64-bit integers that spreads every input bit."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(seed: int, key: int) -> int:
    """A 63-bit seed derived from (seed, key), the same in every process and Python version (hash()
    of a tuple is neither documented stable nor free of collisions: ints hash modulo 2**61 - 1)."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ _splitmix64((key + 0x632BE59BD9B4E019) & _MASK64)) >> 1


class TokenStream:
    """A seeded sequence's randomness, keyed by output position: the draw for its t-th output token
    comes from a generator seeded with (seed, t), whatever came before. So the tokens of a seeded
    request do not depend on how its tokens were grouped into steps: on the rest of the batch, on
    preemption, or on speculative decoding (which samples position t with this same draw, see
    spec_decode.verify_rows, and accepts a proposal only when it equals that sample)."""

    def __init__(self, seed: int, device: torch.device | str):
        self.seed = seed
        self.generator = torch.Generator(device=device)

    def at(self, position: int) -> torch.Generator:
        """The generator for output position `position`, freshly seeded (one object, reseeded)."""
        self.generator.manual_seed(mix_seed(self.seed, position))
        return self.generator


def make_stream(seed: int | None, device: torch.device | str) -> TokenStream | None:
    """The TokenStream of a request with `seed`, or None (the default generator) without one."""
    return None if seed is None else TokenStream(seed, device)


def position_noise(stream: TokenStream, position: int, row: torch.Tensor) -> torch.Tensor:
    """row (a [V] fp32 view) filled with the Exp(1) noise of output position `position` of stream,
    clamped as the sampler clamps it: sample's draw for that position, exactly."""
    row.exponential_(generator=stream.at(position))
    return row.clamp_min_(kMinExponential)


def host_to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without a host sync: a copy from pageable memory waits for the stream
    to drain, which would stall the engine's pipelined decode until the step it just launched has
    finished. Pinned + non_blocking does not wait (the pinned block is kept until the copy has run)."""
    return t.to(device) if device.type != "cuda" else t.pin_memory().to(device, non_blocking=True)


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list as a tensor on `device` without a host sync (host_to)."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return host_to(torch.tensor(values, dtype=dtype), device)


def _row_values(values: list[float], like: torch.Tensor) -> torch.Tensor:
    """Per-row parameters as an fp32 column `[B, 1]` on the device of `like`."""
    return to_device(values, torch.float32, like.device).unsqueeze(1)


def _scatter_index(id_lists: list[list[int]], vocab_size: int, device: torch.device):
    """(rows, cols) LongTensors `[num_ids]` for indexing a `[B, V + 1]` tensor.

    Ids outside [0, V) go to the extra column V, which callers drop, as HF does for
    ids past the lm_head's vocabulary.
    """
    lengths = torch.tensor([len(ids) for ids in id_lists], dtype=torch.long)
    rows = torch.repeat_interleave(torch.arange(len(id_lists)), lengths)
    cols = torch.tensor(list(chain.from_iterable(id_lists)), dtype=torch.long)
    cols = torch.where((cols < 0) | (cols >= vocab_size), vocab_size, cols)
    return host_to(rows, device), host_to(cols, device)


def id_mask(id_lists: list[list[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """BoolTensor `[B, V]`: True where the token id appears in that row's list."""
    rows, cols = _scatter_index(id_lists, vocab_size, device)
    mask = torch.zeros(len(id_lists), vocab_size + 1, dtype=torch.bool, device=device)
    # scatter_ with a scalar, not mask[rows, cols] = True: that setitem copies a CPU scalar tensor to
    # the GPU, a host sync (torch.cuda.set_sync_debug_mode("error") raised on it on an H200)
    mask.view(-1).scatter_(0, rows * (vocab_size + 1) + cols, True)
    return mask[:, :vocab_size]


def id_counts(id_lists: list[list[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """FloatTensor `[B, V]`: how often each token id appears in that row's list."""
    rows, cols = _scatter_index(id_lists, vocab_size, device)
    counts = torch.zeros(len(id_lists), vocab_size + 1, dtype=torch.float32, device=device)
    # index_add_ (atomics on CUDA) rather than index_put_(accumulate=True), whose CUDA path sorts
    counts.view(-1).index_add_(0, rows * (vocab_size + 1) + cols, torch.ones_like(cols, dtype=torch.float32))
    return counts[:, :vocab_size]


def apply_repetition_penalty(logits, penalty, seen_mask):
    """HF RepetitionPenaltyLogitsProcessor: seen tokens' logits shrink toward -inf.

    logits `[B, V]`, penalty `[B, 1]`, seen_mask `[B, V]` bool.
    """
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen_mask, penalized, logits)


def apply_presence_frequency(logits, presence, frequency, output_counts):
    """OpenAI/vLLM: logit -= frequency * count + presence * [count > 0].

    logits `[B, V]`, presence and frequency `[B, 1]`, output_counts `[B, V]` fp32.
    """
    return logits - frequency * output_counts - presence * (output_counts > 0).float()


def apply_top_k(logits, top_k, max_k: int):
    """HF TopKLogitsWarper: keep logits >= the k-th largest (ties at the boundary all kept).

    logits `[B, V]`, top_k LongTensor `[B]` in [1, V], or 0 for "disabled";
    max_k = max(top_k), passed from the host to avoid a sync.
    """
    kth_index = (top_k - 1).clamp(min=0).unsqueeze(1)  # [B, 1]
    kth_value = torch.topk(logits, max_k, dim=-1).values.gather(1, kth_index)
    kth_value = torch.where(top_k.unsqueeze(1) > 0, kth_value, kNegInf)
    return logits.masked_fill(logits < kth_value, kNegInf)


def apply_top_p(logits, removal_threshold):
    """HF TopPLogitsWarper: drop the low tail whose cumulative probability is <= 1 - top_p.

    logits `[B, V]`, removal_threshold `[B, 1]` = 1 - top_p (computed in float64 as HF
    does), or -1 for "disabled". The largest token is always kept (min_tokens_to_keep=1).
    """
    sorted_logits, sorted_indices = torch.sort(logits, descending=False)
    cumulative_probs = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    sorted_to_remove = cumulative_probs <= removal_threshold
    sorted_to_remove[:, -1] = False
    to_remove = sorted_to_remove.scatter(1, sorted_indices, sorted_to_remove)
    return logits.masked_fill(to_remove, kNegInf)


def apply_min_p(logits, min_p):
    """HF MinPLogitsWarper: drop tokens with prob < min_p * max prob; keep the top one.

    logits `[B, V]`, min_p `[B, 1]` (0 means disabled).
    """
    probs = torch.softmax(logits, dim=-1)
    to_remove = probs < min_p * probs.amax(dim=-1, keepdim=True)
    to_remove.scatter_(1, probs.argmax(dim=-1, keepdim=True), False)
    return logits.masked_fill(to_remove, kNegInf)


def _check_batch(logits, params, seen_ids, output_ids, suppress_ids, generators=None) -> None:
    if logits.dim() != 2 or logits.dtype != torch.float32:
        raise ValueError(
            f"logits must be a 2-D float32 tensor [B, V], got {tuple(logits.shape)} {logits.dtype}")
    batch_size = logits.shape[0]
    for name, value in [("params", params), ("seen_ids", seen_ids), ("output_ids", output_ids),
                        ("suppress_ids", suppress_ids), ("generators", generators)]:
        if value is not None and len(value) != batch_size:
            raise ValueError(f"{name} must have one entry per logits row ({batch_size}), "
                             f"got {len(value)}")


# (allowed ids, logit_bias items, V, device) -> (the allowed-ids mask, the dense logit_bias row), [V]
# tensors on the logits' device, built once per distinct content: a long id list costs ~50 ns an id to
# turn into a tensor (64k allowed ids x 32 rows: ~0.1 s a step), plus the copy, and a step then only
# stacks B cached rows on the device. Keyed by content, not by SamplingParams object: every request runs
# with its own copy of the params it was given (request_checks.fill_max_tokens), so requests sharing a
# list share its rows. The oldest entries go first (64: at most ~40 MB for a 128k vocabulary).
_PARAM_ROWS: OrderedDict = OrderedDict()
_PARAM_ROWS_MAX = 64


def _param_rows(p: SamplingParams, vocab_size: int, device: torch.device) -> tuple:
    allowed_ids = tuple(p.allowed_token_ids) if p.allowed_token_ids is not None else None
    bias_items = tuple(p.logit_bias.items()) if p.logit_bias else None
    key = (allowed_ids, bias_items, vocab_size, str(device))
    entry = _PARAM_ROWS.get(key)
    if entry is None:
        allowed = bias = None
        if allowed_ids is not None:
            allowed = torch.zeros(vocab_size, dtype=torch.bool)
            allowed[torch.tensor(allowed_ids, dtype=torch.long)] = True
            allowed = host_to(allowed, device)
        if bias_items is not None:
            bias = torch.zeros(vocab_size, dtype=torch.float32)
            bias[torch.tensor([t for t, _ in bias_items], dtype=torch.long)] = torch.tensor([b for _, b in bias_items])
            bias = host_to(bias, device)
        entry = _PARAM_ROWS[key] = (allowed, bias)
        while len(_PARAM_ROWS) > _PARAM_ROWS_MAX:
            _PARAM_ROWS.popitem(last=False)
    else:
        _PARAM_ROWS.move_to_end(key)
    return entry


def _apply_penalties(logits, params, seen_ids, output_ids, suppress_ids):
    """allowed_token_ids and logit_bias (vLLM's order), then repetition, presence/frequency penalties and
    suppression: every row, greedy or not."""
    vocab_size, device = logits.shape[1], logits.device
    # (ids are < V: SamplingParams and the request's checks against the vocabulary)
    if any(p.allowed_token_ids is not None or p.logit_bias for p in params):
        rows = [_param_rows(p, vocab_size, device) if p.allowed_token_ids is not None or p.logit_bias else (None, None)
                for p in params]
        if any(r[0] is not None for r in rows):
            everything = torch.ones(vocab_size, dtype=torch.bool, device=device)
            allowed = torch.stack([r[0] if r[0] is not None else everything for r in rows])
            logits = logits.masked_fill(~allowed, kNegInf)
        if any(r[1] is not None for r in rows):
            zeros = torch.zeros(vocab_size, dtype=torch.float32, device=device)
            logits = logits + torch.stack([r[1] if r[1] is not None else zeros for r in rows])
    if any(p.repetition_penalty != 1.0 for p in params):
        penalty = _row_values([p.repetition_penalty for p in params], logits)
        logits = apply_repetition_penalty(logits, penalty, id_mask(seen_ids, vocab_size, device))
    if any(p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in params):
        presence = _row_values([p.presence_penalty for p in params], logits)
        frequency = _row_values([p.frequency_penalty for p in params], logits)
        counts = id_counts(output_ids, vocab_size, device)
        logits = apply_presence_frequency(logits, presence, frequency, counts)
    if suppress_ids is not None and any(suppress_ids):
        logits = logits.masked_fill(id_mask(suppress_ids, vocab_size, device), kNegInf)
    return logits


def _apply_warpers(logits, params):
    """Temperature, top-k, top-p, min-p for sampling rows; no-op values for greedy rows."""
    vocab_size = logits.shape[1]
    sampling = [p for p in params if not p.greedy]
    if any(p.temperature != 1.0 for p in sampling):
        temperature = [1.0 if p.greedy else max(p.temperature, kTinyTemperature) for p in params]
        logits = logits / _row_values(temperature, logits)
        if any(p.temperature < kTinyTemperature for p in sampling):  # the T -> 0 limit: the tied maxima
            tiny = to_device([not p.greedy and p.temperature < kTinyTemperature for p in params], torch.bool,
                             logits.device).unsqueeze(1)
            logits = logits.masked_fill(tiny & (logits < logits.amax(dim=-1, keepdim=True)), kNegInf)
    if any(p.top_k > 0 for p in sampling):
        top_k = [0 if p.greedy else min(max(p.top_k, 0), vocab_size) for p in params]
        top_k_rows = to_device(top_k, torch.long, logits.device)
        logits = apply_top_k(logits, top_k_rows, max(top_k))
    if any(p.top_p < 1.0 for p in sampling):
        threshold = [-1.0 if p.greedy or p.top_p >= 1.0 else 1.0 - p.top_p for p in params]
        logits = apply_top_p(logits, _row_values(threshold, logits))
    if any(p.min_p > 0.0 for p in sampling):
        min_p = [0.0 if p.greedy else p.min_p for p in params]
        logits = apply_min_p(logits, _row_values(min_p, logits))
    return logits


def process_logits(
    logits: torch.Tensor,  # [B, V] float32
    params: list[SamplingParams],
    seen_ids: list[list[int]],  # prompt + output ids per row (repetition penalty)
    output_ids: list[list[int]],  # output ids per row (presence / frequency)
    suppress_ids: list[list[int]] | None = None,  # ids masked to -inf per row
) -> torch.Tensor:
    """Processed logits `[B, V]` (masked entries -inf); `logits` is not modified."""
    _check_batch(logits, params, seen_ids, output_ids, suppress_ids)
    logits = _apply_penalties(logits, params, seen_ids, output_ids, suppress_ids)
    return _apply_warpers(logits, params)


def _exponential_noise(probs, params, generators, positions):
    """Exp(1) noise `[B, V]`: seeded rows from their own generator (a TokenStream at the row's
    output position, or a plain torch.Generator drawn in sequence), the rest in one call."""
    noise = torch.ones_like(probs)
    generators = generators or [None] * len(params)
    default_rows = [i for i, (p, g) in enumerate(zip(params, generators))
                    if g is None and not p.greedy]
    if len(default_rows) == len(params):
        noise.exponential_()
    elif default_rows:
        rows = to_device(default_rows, torch.long, probs.device)
        noise.index_copy_(0, rows, torch.empty(len(default_rows), probs.shape[1], device=probs.device).exponential_())
    for row, (p, generator) in enumerate(zip(params, generators)):
        if generator is not None and not p.greedy:
            if isinstance(generator, TokenStream):
                position_noise(generator, positions[row], noise[row])
            else:
                noise[row].exponential_(generator=generator)
    return noise.clamp_min_(kMinExponential)


def sample(
    logits: torch.Tensor,  # [B, V] float32
    params: list[SamplingParams],
    seen_ids: list[list[int]],
    output_ids: list[list[int]],
    suppress_ids: list[list[int]] | None = None,
    generators: list[TokenStream | torch.Generator | None] | None = None,
    positions: list[int] | None = None,
) -> torch.Tensor:
    """Next token per row, LongTensor `[B]`; see `process_logits` for the arguments. A TokenStream
    row draws the noise of its output position: positions[row], by default len(output_ids[row]).

    Greedy rows take the first argmax. Sampling rows use the exponential race:
    argmax(p / E) with E ~ Exp(1) i.i.d. picks token i with probability p_i, and
    needs no host sync (unlike a cumulative-sum search with a CPU-side draw).
    """
    _check_batch(logits, params, seen_ids, output_ids, suppress_ids, generators)
    if positions is None:
        positions = [len(out) for out in output_ids]
    elif len(positions) != len(params):
        raise ValueError(f"positions must have one entry per row ({len(params)}), got {len(positions)}")
    return draw(process_logits(logits, params, seen_ids, output_ids, suppress_ids), params, generators, positions)


def _argmax(x: torch.Tensor) -> torch.Tensor:
    """torch.argmax(x, dim=-1) of [B, V] rows (the first maximum; NaN above everything). fp32 rows on a
    GPU go through fastinfer's argmax_rows, one CTA per row: torch's reduction took 27 us for one
    128256-wide row of logits on an H200 (visit 5's batch-1 profile, ~0.6% of the step)."""
    if x.is_cuda and x.dtype == torch.float32 and x.dim() == 2 and x.shape[1] > 0 and x.stride(1) == 1:
        from . import _C, _ops
        choice = os.environ.get("FASTINFER_ARGMAX", "kernel")
        if choice not in ("kernel", "torch"):
            raise ValueError(f"FASTINFER_ARGMAX must be kernel or torch, got {choice!r}")
        if _C.with_cuda and choice == "kernel":  # torch: the pick before 2026-11-28, one setting away
            return _ops.argmax_rows(x)
    return x.argmax(dim=-1)


def draw(
    processed: torch.Tensor,  # [B, V] float32, process_logits' output
    params: list[SamplingParams],
    generators: list[TokenStream | torch.Generator | None] | None,
    positions: list[int],
    probs: torch.Tensor | None = None,  # softmax(processed) when the caller has it already
) -> torch.Tensor:
    """sample's draw from already processed logits (a caller that also needs the probabilities, as the
    draft proposer does, processes them once)."""
    is_greedy = [p.greedy for p in params]
    if all(is_greedy):
        return _argmax(processed)
    probs = torch.softmax(processed, dim=-1) if probs is None else probs
    sampled = _argmax(probs / _exponential_noise(probs, params, generators, positions))
    if not any(is_greedy):
        return sampled
    greedy_rows = to_device(is_greedy, torch.bool, processed.device)
    return torch.where(greedy_rows, _argmax(processed), sampled)
