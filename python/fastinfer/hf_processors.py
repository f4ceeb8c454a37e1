"""HF generate()'s remaining built-in logits processors, as HF computes them, for fastinfer.generate's copies of
HF's loops (sample_search.py, beam_search.py): SequenceBiasLogitsProcessor (sequence_bias, HF's first
processor: hf_decoding.processed_scores applies it before the penalties), ForcedBOSTokenLogitsProcessor,
ForcedEOSTokenLogitsProcessor, InfNanRemoveLogitsProcessor, ExponentialDecayLengthPenalty and
SuppressTokensAtBeginLogitsProcessor (apply:
after the prefix constraint, before generate()'s own processors, in HF's order) and LogitNormalization
(renormalize, after the warpers). settings_from reads their arguments for gen_config.resolve."""
from __future__ import annotations

import torch

from . import gen_config
from .sampling_params import is_token_sequences


def settings_from(merged: dict, eos: list[int], suppressed: list[int]) -> dict:
    """GenerationSettings fields from the merged generation arguments (gen_config.resolve), checked."""
    fields = _forced_and_bias(merged, suppressed)
    fields.update(_decay_and_begin(merged, eos))
    return fields


def active(settings: gen_config.GenerationSettings) -> bool:
    """Whether `apply` changes anything."""
    return (settings.forced_bos_token_id is not None or bool(settings.forced_eos_token_id)
            or settings.exponential_decay is not None or bool(settings.begin_suppress_tokens)
            or settings.remove_invalid_values)


def apply(settings: gen_config.GenerationSettings, input_ids: torch.Tensor, scores: torch.Tensor,
          width: int) -> torch.Tensor:
    """HF's forced BOS / EOS, ExponentialDecayLengthPenalty and SuppressTokensAtBeginLogitsProcessor on scores
    [rows, vocab] of HF's padded rows input_ids [rows, cur_len]; width: the padded prompt's length."""
    cur_len = input_ids.shape[-1]
    if settings.forced_bos_token_id is not None and cur_len == 1:
        scores = torch.full_like(scores, float("-inf"))
        scores[:, settings.forced_bos_token_id] = 0
    if settings.forced_eos_token_id and cur_len == width + settings.max_new_tokens - 1:  # HF's max_length - 1
        scores = torch.full_like(scores, float("-inf"))
        scores[:, list(settings.forced_eos_token_id)] = 0
    if settings.remove_invalid_values:  # HF's InfNanRemoveLogitsProcessor: NaN -> 0, +-inf -> the finite extremes
        finfo = torch.finfo(scores.dtype)
        cleaned = torch.where(scores != scores, 0.0, scores)
        cleaned = torch.where(scores == float("inf"), finfo.max, cleaned)
        scores = torch.where(scores == -float("inf"), finfo.min, cleaned)
    if settings.exponential_decay is not None:
        start, factor = settings.exponential_decay
        regulation_start = start + width
        if cur_len > regulation_start:
            eos = torch.tensor(settings.eos_token_ids, device=scores.device)
            penalty = torch.abs(scores[:, eos]) * (pow(factor, cur_len - regulation_start) - 1)
            penalty = penalty.masked_fill(~torch.isfinite(scores[:, eos]), 0.0)
            penalties = torch.zeros_like(scores)
            penalties[:, eos] = penalty
            scores = scores + penalties
    if settings.begin_suppress_tokens:
        # HF's begin_index: the prompt width, one later when a forced BOS fills a 1-token prompt's first step
        begin = width if (width > 1 or settings.forced_bos_token_id is None) else width + 1
        if cur_len == begin:
            banned = torch.isin(torch.arange(scores.shape[-1], device=scores.device),
                                torch.tensor(settings.begin_suppress_tokens, device=scores.device))
            scores = torch.where(banned, float("-inf"), scores)
    return scores


def renormalize(settings: gen_config.GenerationSettings, scores: torch.Tensor) -> torch.Tensor:
    """HF's LogitNormalization (renormalize_logits), the last processor: log_softmax."""
    return scores.log_softmax(dim=-1) if settings.renormalize_logits else scores


def sequence_bias(settings: gen_config.GenerationSettings, input_ids: torch.Tensor,
                  scores: torch.Tensor) -> torch.Tensor:
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


def _forced_and_bias(merged: dict, suppressed: list[int]) -> dict:
    """sequence_bias (HF's list of [token ids, bias] pairs, or its older dict of tuple -> bias) as (ids, bias)
    pairs, later entries replacing earlier ones as HF's dict does; forced_bos_token_id; forced_eos_token_id
    (an id or a list of them)."""
    bias = merged["sequence_bias"]
    pairs: dict[tuple[int, ...], float] = {}
    if bias is not None:
        # HF's SequenceBiasLogitsProcessor._validate_arguments: a non-empty list of [list of ids, float] pairs, or a
        # dict of non-empty id tuples to floats (ints are not floats there)
        is_dict = isinstance(bias, dict)
        items = list(bias.items()) if is_dict else bias
        ok = isinstance(items, list) and bool(items) and all(
            isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], tuple if is_dict else list)
            and is_token_sequences([item[0]]) and isinstance(item[1], float) for item in items)
        if not ok:
            raise ValueError(f"sequence_bias must be a non-empty list of [[token ids], float bias] pairs (or a dict of "
                             f"token-id tuples to float biases), as HF's; got {bias!r:.120}")
        for ids, value in items:
            pairs[tuple(ids)] = value
    bos = merged["forced_bos_token_id"]
    if bos is not None:
        bos = gen_config._token_ids(bos, "forced_bos_token_id")
        if len(bos) != 1:
            raise ValueError(f"forced_bos_token_id must be one token id, got {merged['forced_bos_token_id']!r}")
        bos = bos[0]
    forced_eos = () if merged["forced_eos_token_id"] is None else tuple(
        gen_config._token_ids(merged["forced_eos_token_id"], "forced_eos_token_id"))
    clash = sorted(set(forced_eos) | ({bos} if bos is not None else set())) if suppressed else []
    clash = [t for t in clash if t in suppressed]
    if clash:  # HF forces the token, then suppresses it: a row of -inf only
        raise ValueError(f"generate(): forced_bos_token_id / forced_eos_token_id {clash} also in suppress_tokens")
    return {"sequence_bias": tuple(pairs.items()), "forced_bos_token_id": bos, "forced_eos_token_id": forced_eos}


def _decay_and_begin(merged: dict, eos: list[int]) -> dict:
    """exponential_decay_length_penalty ((start index, factor): needs EOS ids, as HF's processor),
    begin_suppress_tokens (ids; an empty list builds nothing) and renormalize_logits (a bool), checked."""
    decay = merged["exponential_decay_length_penalty"]
    if decay is not None:
        if (not isinstance(decay, (list, tuple)) or len(decay) != 2 or isinstance(decay[0], bool)
                or not isinstance(decay[0], int) or isinstance(decay[1], bool) or not isinstance(decay[1], (int, float))):
            raise ValueError(f"exponential_decay_length_penalty must be (start index, decay factor), got {decay!r}")
        if not eos:
            raise ValueError("exponential_decay_length_penalty needs an eos_token_id (it raises the EOS scores)")
        decay = (decay[0], float(decay[1]))
    begin = merged["begin_suppress_tokens"]
    begin = () if begin is None else tuple(gen_config._token_ids(begin, "begin_suppress_tokens"))
    renormalize, invalid = merged["renormalize_logits"], merged["remove_invalid_values"]
    for key, value in (("renormalize_logits", renormalize), ("remove_invalid_values", invalid)):
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be True or False, got {value!r}")
    if invalid and merged["suppress_tokens"]:  # HF suppresses after it (-inf stays); fastinfer's bans run before
        raise ValueError("generate(): remove_invalid_values with suppress_tokens is not supported")
    return {"exponential_decay": decay, "begin_suppress_tokens": begin, "renormalize_logits": renormalize,
            "remove_invalid_values": invalid}
