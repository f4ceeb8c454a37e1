"""What a caller of fastinfer.generate hooks into HF's decoding loop, applied as HF applies it: generate()'s
``logits_processor`` list (after HF's own processors, before its sampling warpers), ``prefix_allowed_tokens_fn``
(HF's PrefixConstrainedLogitsProcessor), ``stopping_criteria`` and ``max_time`` (HF's MaxTimeCriteria).
sample_search.py and beam_search.py call these with HF's tensors (the padded rows so far, the scores)."""
from __future__ import annotations

import time

import torch

from . import gen_config


def processes(settings: gen_config.GenerationSettings) -> bool:
    """Whether `process` has anything to apply: custom processors, a prefix constraint or a forced token."""
    return (bool(settings.logits_processor) or settings.prefix_allowed_tokens_fn is not None
            or settings.forced_bos_token_id is not None or bool(settings.forced_eos_token_id))


def sequence_bias(settings: gen_config.GenerationSettings, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """HF's SequenceBiasLogitsProcessor, the first of its processors: one bias tensor (each one-token
    sequence's bias, then each longer one's on its last token in the rows whose last tokens are the rest of
    it; a sequence longer than the row is ignored) added to scores once. input_ids: HF's padded rows."""
    vocab = scores.shape[-1]
    out_of_range = [t for ids, _ in settings.sequence_bias for t in ids if t >= vocab]
    if out_of_range:
        raise ValueError(f"The model vocabulary size is {vocab}, but the following tokens were being biased: "
                         f"{out_of_range}")
    bias = torch.zeros_like(scores)
    single = torch.zeros(vocab, dtype=torch.float, device=scores.device)
    ones = [(ids[0], b) for ids, b in settings.sequence_bias if len(ids) == 1]
    if ones:
        single[[t for t, _ in ones]] = torch.tensor([b for _, b in ones], device=scores.device)
    bias += single
    by_prefix: dict[int, list] = {}
    for ids, b in settings.sequence_bias:
        if len(ids) > 1:
            by_prefix.setdefault(len(ids) - 1, []).append((ids, b))
    for length, group in by_prefix.items():
        if length > input_ids.shape[1]:
            continue
        prefixes = torch.tensor([ids[:-1] for ids, _ in group], device=scores.device)
        last = torch.tensor([ids[-1] for ids, _ in group], device=scores.device)
        values = torch.tensor([b for _, b in group], dtype=torch.float, device=scores.device)
        matching = (input_ids[:, None, -length:] == prefixes).all(dim=-1)
        bias.index_add_(1, last, torch.where(matching, values, 0.0).to(bias.dtype))
    return scores + bias


def stops_for(settings: gen_config.GenerationSettings) -> "Stops | None":
    """The caller's stopping criteria / max_time as one callable, None when there are none."""
    return Stops(settings) if settings.stopping_criteria or settings.max_time is not None else None


def process(settings: gen_config.GenerationSettings, input_ids: torch.Tensor, scores: torch.Tensor,
            group: int, max_length: int | None = None) -> torch.Tensor:
    """scores [rows, vocab] of input_ids [rows, length] after the prefix constraint, the forced BOS / EOS
    token (max_length: HF's, the padded prompt width plus max_new_tokens) and the custom processors, in HF's
    order. rows: a prompt's `group` rows adjacent (its beams, or its
    num_return_sequences samples: HF's max(num_beams, num_return_sequences)). HF runs the constraint after
    its penalties, n-gram / bad-word bans and min-length EOS bans, before suppress_tokens; fastinfer's
    equivalents of those all run before it here, which is the same unless suppress_tokens are set
    (refused with a constraint, gen_config). The custom processors follow."""
    fn = settings.prefix_allowed_tokens_fn
    if fn is not None:  # HF's PrefixConstrainedLogitsProcessor
        mask = torch.full_like(scores, float("-inf"))
        for row in range(input_ids.shape[0]):
            allowed = fn(row // group, input_ids[row])
            if len(allowed) == 0:
                raise ValueError(f"prefix_allowed_tokens_fn returned an empty list for batch ID {row // group}: "
                                 f"the constraint is unsatisfiable")
            mask[row, allowed] = 0
        scores = scores + mask
        # HF: where every row of a prompt has only -inf left, the allowed tokens are forced with score 0
        stuck = scores.amax(dim=-1).isneginf().view(-1, group).all(dim=-1, keepdim=True)
        scores = torch.where(stuck.repeat_interleave(group, dim=0), mask, scores)
    cur_len = input_ids.shape[-1]  # HF's forced BOS / EOS (its processors' order: after the prefix constraint)
    if settings.forced_bos_token_id is not None and cur_len == 1:
        scores = torch.full_like(scores, float("-inf"))
        scores[:, settings.forced_bos_token_id] = 0
    if settings.forced_eos_token_id and max_length is not None and cur_len == max_length - 1:
        scores = torch.full_like(scores, float("-inf"))
        scores[:, list(settings.forced_eos_token_id)] = 0
    for processor in settings.logits_processor:
        scores = processor(input_ids, scores)
    return scores


class Stops:
    """HF's StoppingCriteriaList for the custom criteria and max_time: a bool per row of input_ids."""

    def __init__(self, settings: gen_config.GenerationSettings):
        self.criteria = settings.stopping_criteria
        self.max_time = settings.max_time
        self.started = time.time()  # HF's MaxTimeCriteria: from when generate() builds it, before the prefill

    def __call__(self, input_ids: torch.Tensor, scores) -> torch.Tensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for criterion in self.criteria:
            done = done | criterion(input_ids, scores)
        if self.max_time is not None and time.time() - self.started > self.max_time:
            done = torch.ones_like(done)
        return done
