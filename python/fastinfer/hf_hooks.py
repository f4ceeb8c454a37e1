"""What a caller of fastinfer.generate hooks into HF's decoding loop, applied as HF applies it: generate()'s
``logits_processor`` list (after HF's own processors, before its sampling warpers), ``prefix_allowed_tokens_fn``
(HF's PrefixConstrainedLogitsProcessor), ``stopping_criteria`` and ``max_time`` (HF's MaxTimeCriteria).
sample_search.py and beam_search.py call these with HF's tensors (the padded rows so far, the scores)."""
from __future__ import annotations

import time

import torch

from . import gen_config, hf_processors


def processes(settings: gen_config.GenerationSettings) -> bool:
    """Whether `process` has anything to apply: custom processors, a prefix constraint or hf_processors'."""
    return (bool(settings.logits_processor) or settings.prefix_allowed_tokens_fn is not None
            or hf_processors.active(settings))


def stops_for(settings: gen_config.GenerationSettings) -> "Stops | None":
    """The caller's stopping criteria / max_time as one callable, None when there are none."""
    return Stops(settings) if settings.stopping_criteria or settings.max_time is not None else None


def process(settings: gen_config.GenerationSettings, input_ids: torch.Tensor, scores: torch.Tensor,
            group: int, width: int | None = None) -> torch.Tensor:
    """scores [rows, vocab] of input_ids [rows, length] after the prefix constraint, hf_processors.apply's
    (width: the padded prompt's, HF's input length) and the custom processors, in HF's order. rows: a
    prompt's `group` rows adjacent (its beams, or its num_return_sequences samples: HF's max(num_beams,
    num_return_sequences)). HF runs the constraint after
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
    if width is not None:  # HF's forced BOS / EOS, length penalty and first-step bans, after the constraint
        scores = hf_processors.apply(settings, input_ids, scores, width)
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
