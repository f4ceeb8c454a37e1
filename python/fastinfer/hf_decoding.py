"""What fastinfer.generate's HF-mirroring loops share (beam_search.py: HF's beam search and beam
sampling; sample_search.py: HF's greedy / sampling loop when per-step scores are asked for): a paged KV
cache of reference-counted block tables, the prompts' prefill, HF's processors and warpers, and HF's
output objects."""
from __future__ import annotations

import torch

from . import hf_processors
from .metadata import SeqChunk
from .runner import ModelRunner
from .sampling import process_logits
from .sampling_params import SamplingParams
from .stopping import bad_word_bans, ngram_bans

BLOCK_SIZE = 16
_PREFILL_TOKENS = 8192  # prompts per prefill run, whole, up to about this many tokens


class Blocks:
    """Reference-counted physical blocks of the beams' block tables."""

    def __init__(self, runner: ModelRunner):
        self.runner = runner
        self.free = list(range(runner.num_blocks - 1, -1, -1))
        self.refs = [0] * runner.num_blocks

    def take(self) -> int:
        if not self.free:  # sized for every beam's longest table: a bug, not a user error
            raise RuntimeError("beam search ran out of KV blocks")
        block = self.free.pop()
        self.refs[block] = 1
        return block

    def share(self, table: list[int]) -> list[int]:
        for block in table:
            self.refs[block] += 1
        return list(table)

    def release(self, table: list[int]) -> None:
        for block in table:
            self.refs[block] -= 1
            if self.refs[block] == 0:
                self.free.append(block)

    def writable(self, table: list[int], position: int, copies: list[tuple[int, int]]) -> None:
        """Make the block that will hold `position` the table's own: a new block at a block boundary,
        a copy (queued in `copies`, done before the step runs) of one another beam still holds."""
        index = position // self.runner.block_size
        if index == len(table):
            table.append(self.take())
        elif self.refs[table[index]] > 1:
            fresh = self.take()
            copies.append((table[index], fresh))
            self.refs[table[index]] -= 1
            table[index] = fresh


def copy_blocks(runner: ModelRunner, copies: list[tuple[int, int]]) -> None:
    if not copies:
        return
    src = torch.tensor([s for s, _ in copies], device=runner.device)
    dst = torch.tensor([d for _, d in copies], device=runner.device)
    for cache in runner.kv_caches:
        cache.index_copy_(0, dst, cache.index_select(0, src))


def prefill(runner: ModelRunner, pool: Blocks, prompts: list[list[int]]) -> tuple[list[list[int]], torch.Tensor]:
    """Each prompt computed into blocks of its own (prompts whole, up to about _PREFILL_TOKENS a run):
    their block tables and the fp32 logits of their last positions [len(prompts), vocab]."""
    tables, logits_rows, start = [], [], 0
    while start < len(prompts):
        stop, tokens = start, 0
        while stop < len(prompts) and (stop == start or tokens + len(prompts[stop]) <= _PREFILL_TOKENS):
            tokens += len(prompts[stop])
            stop += 1
        chunks = []
        for prompt in prompts[start:stop]:
            table = [pool.take() for _ in range(-(-len(prompt) // BLOCK_SIZE))]
            chunks.append(SeqChunk(prompt, 0, table))
            tables.append(table)
        logits_rows.append(runner.run(chunks).float().clone())
        start = stop
    return tables, torch.cat(logits_rows)


def decode_chunk(runner: ModelRunner, token: int, position: int, table: list[int], prompt: list[int],
                 generated) -> SeqChunk:
    """A decode step's chunk for one row: its token at `position`; on a Phi-3 LongRoPE model
    (ModelConfig.rope_recompute_at_switch), at a short prompt's first step at original_max_position_embeddings,
    the row's whole sequence from position 0 (prompt + generated(), the tokens after the prompt up to this
    one), recomputed with the long factors into the same blocks, as HF's Phi-3 generate drops its cache there.
    Rows sharing a block hold the same tokens in it, so they rewrite it with the same values."""
    cfg = runner.model.config
    limit = cfg.rope_long_from if cfg.rope_recompute_at_switch else 0
    if limit and position == limit and len(prompt) <= limit:
        tokens = list(prompt) + list(generated())
        assert len(tokens) == position + 1, (len(tokens), position)
        return SeqChunk(tokens, 0, table, prompt_len=len(tokens))
    return SeqChunk([token], position, table)


def hf_warpers(scores: torch.Tensor, p, min_keep: int, extra: dict | None = None) -> torch.Tensor:
    """HF's sampling warpers in its order and arithmetic (TemperatureLogitsWarper, from `extra` TopHLogitsWarper,
    then TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper, then from `extra` TypicalLogitsWarper,
    EpsilonLogitsWarper, EtaLogitsWarper), each keeping at least min_keep tokens (TopH: at least one, as HF's)."""
    ninf = -float("inf")
    extra = extra or {}
    if p.temperature != 1.0:
        scores = scores / p.temperature
    if "top_h" in extra:  # HF's TopHLogitsWarper: of the top 100, the head whose entropy stays within top_h of theirs
        top_logits, top_idx = torch.topk(scores, min(100, scores.shape[-1]), dim=-1, largest=True, sorted=True)
        dist = torch.distributions.Categorical(logits=top_logits)
        probs = dist.probs
        tau = (dist.entropy() * extra["top_h"]).unsqueeze(-1)
        selection = torch.cumsum(-probs * torch.log(probs), dim=-1) <= tau
        selection[:, 0] = True
        keep = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter_(1, top_idx, selection)
        scores = scores.masked_fill(~keep, ninf)
    if p.top_k > 0:
        k = min(max(p.top_k, min_keep), scores.size(-1))
        scores = scores.masked_fill(scores < torch.topk(scores, k)[0][..., -1, None], ninf)
    if p.top_p < 1.0:
        sorted_logits, sorted_indices = torch.sort(scores, descending=False)
        remove = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - p.top_p)
        remove[..., -min_keep:] = 0
        scores = scores.masked_fill(remove.scatter(1, sorted_indices, remove), ninf)
    if p.min_p > 0.0:
        probs = torch.softmax(scores, dim=-1)
        remove = probs < p.min_p * probs.amax(dim=-1, keepdim=True)
        remove.scatter_(-1, torch.topk(probs, min(min_keep, probs.shape[-1]), dim=-1).indices, False)
        scores = scores.masked_fill(remove, ninf)
    if "typical_p" in extra:  # keep the tokens whose surprisal is closest to the entropy, up to that mass
        normalized = torch.log_softmax(scores, dim=-1)
        entropy = -(normalized * torch.exp(normalized)).nansum(-1, keepdim=True)
        shifted, order = torch.sort(torch.abs(-normalized - entropy), descending=False)
        last = (scores.gather(-1, order).softmax(dim=-1).cumsum(dim=-1) < extra["typical_p"]).sum(dim=1)
        last.clamp_(max=shifted.shape[-1] - 1)
        remove = shifted > shifted.gather(1, last.view(-1, 1))
        remove[..., :min_keep] = 0
        scores = scores.masked_fill(remove.scatter(1, order, remove), ninf)
    for key in ("epsilon_cutoff", "eta_cutoff"):
        if key not in extra:
            continue
        probs = scores.softmax(dim=-1)
        if key == "epsilon_cutoff":
            cutoff = extra[key]
        else:  # eta: min(eta, sqrt(eta) exp(-entropy)) per row
            eta = torch.tensor(extra[key], device=scores.device)
            entropy = torch.distributions.Categorical(logits=scores).entropy()
            cutoff = torch.min(eta, torch.sqrt(eta) * torch.exp(-entropy))[..., None]
        keep_k = min(min_keep, scores.size(-1))
        remove = (probs < cutoff) & (scores < torch.topk(scores, keep_k)[0][..., -1, None])
        scores = scores.masked_fill(remove, ninf)
    return scores


def processed_scores(logits, running_sequences, prompts, holes, settings, params, width, cur_len,
                     num_beams, log_softmax: bool = True) -> torch.Tensor:
    """log_softmax of each beam's logits (log_softmax=False: the logits themselves, HF's _sample), then
    HF's processors on them: sequence_bias, the repetition penalty (the prompt without its left padding, the masked
    tokens after it, the beam's tokens), the n-gram and bad-word bans over the whole padded row,
    min_new_tokens' EOS ban, suppress_tokens and one-token bad words (params.logit_bias)."""
    log_probs = torch.log_softmax(logits, dim=-1) if log_softmax else logits
    rows = running_sequences.shape[0] * num_beams
    if settings.sequence_bias:  # HF's first processor
        log_probs = hf_processors.sequence_bias(settings, running_sequences[:, :, :cur_len].reshape(rows, cur_len),
                                                log_probs)
    step = cur_len - width
    generated = running_sequences[:, :, width:cur_len].reshape(rows, step).tolist()
    history_needed = params.no_repeat_ngram_size or params.bad_words_ids
    full = running_sequences[:, :, :cur_len].reshape(rows, cur_len).tolist() if history_needed else None
    suppress = []
    for row in range(rows):
        banned = list(settings.eos_token_ids) if step < settings.min_new_tokens else []
        if history_needed:
            banned += ngram_bans(full[row], params.no_repeat_ngram_size) + bad_word_bans(full[row], params.bad_words_ids)
        suppress.append(banned)
    penalised = params.repetition_penalty != 1.0
    seen = [list(holes[row // num_beams]) + prompts[row // num_beams] + generated[row] if penalised else []
            for row in range(rows)]
    return process_logits(log_probs, [params] * rows, seen, generated, suppress)


def processor_params(params: SamplingParams) -> SamplingParams:
    """params without its warpers (temperature 0: greedy): HF's processors run from these, its warpers
    from hf_warpers."""
    if params.greedy:
        return params
    from dataclasses import replace
    return replace(params, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0)


def hf_output(kind: str, **fields):
    """transformers' generation output class `kind` (GenerateDecoderOnlyOutput, GenerateBeamDecoderOnlyOutput:
    what HF returns) when transformers is installed, else a plain object with the same fields."""
    try:
        import transformers.generation as hf_generation
    except ImportError:
        from types import SimpleNamespace
        return SimpleNamespace(**{"scores": None, "logits": None, "attentions": None, "hidden_states": None,
                                  "cache": None, **fields})
    return getattr(hf_generation, kind)(**fields)
