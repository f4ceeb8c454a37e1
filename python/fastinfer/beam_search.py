"""Beam search for ``fastinfer.generate`` (HF's ``num_beams > 1``; with ``do_sample=True`` HF's beam sampling).

The selection is HF transformers' vectorized beam search (``GenerationMixin._beam_search``, 5.x) step
for step, on tensors of the same shapes: every step keeps the top ``max(2, 1 + #EOS) * num_beams``
continuations of each prompt over all its beams (log-softmax of the logits, then HF's processors on
those log-probs, plus the beam's running score), moves the best of them that hit EOS or the length
limit into the finished set (score = sum / new-length ** length_penalty), continues with the best
``num_beams`` others, and stops by HF's rules (``early_stopping`` True / False / "never"). Given the
same logits it picks the same tokens, ties included (the same torch.topk calls on the same layouts).
Beam sampling draws the continuations instead (HF's warpers on the log-probs: temperature, top-k, top-p,
min-p, each keeping at least #EOS + 1 tokens; then torch.multinomial over all beams' accumulated
scores, from torch's global generator as HF does, so a torch.manual_seed before either gives the same).

What is fastinfer's own is the KV cache: each prompt is prefilled once, and its beams are block
tables over one paged cache. A beam that continues another shares all of its blocks (reference
counts); the block a beam is about to write into is copied first when another beam still holds it
(copy-on-write of at most one partial block per beam and step), so reordering beams never copies a
whole cache as HF's ``reorder_cache`` does. On a GPU the decode steps (a fixed batch of
``batch * num_beams`` rows) replay one CUDA graph.
"""
from __future__ import annotations

import torch

from . import gen_config
from .metadata import SeqChunk
from .runner import ModelRunner
from .sampling import process_logits
from .stopping import bad_word_bans, ngram_bans

BLOCK_SIZE = 16
_PREFILL_TOKENS = 8192  # prompts per prefill run, whole, up to about this many tokens


class _Blocks:
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


def _copy_blocks(runner: ModelRunner, copies: list[tuple[int, int]]) -> None:
    if not copies:
        return
    src = torch.tensor([s for s, _ in copies], device=runner.device)
    dst = torch.tensor([d for _, d in copies], device=runner.device)
    for cache in runner.kv_caches:
        cache.index_copy_(0, dst, cache.index_select(0, src))


def output_fill_value(settings: gen_config.GenerationSettings) -> int:
    """What HF's beam search writes after a returned sequence's end: `pad_token_id or eos_token_id[0]`
    on its tensors (so a pad id of 0 gives the first EOS id), -1 without EOS ids."""
    if not settings.eos_token_ids:
        return -1
    return settings.pad_token_id if settings.pad_token_id else settings.eos_token_ids[0]


def beam_search(loaded, input_ids: torch.Tensor, prompts: list[list[int]], holes: list[tuple[int, ...]],
                settings: gen_config.GenerationSettings, decode_graphs: bool | None = None,
                stop_strings=None) -> torch.Tensor:
    """HF's output: LongTensor [batch * num_return_sequences, width + generated] on input_ids' device,
    the best num_return_sequences finished beams of each prompt, best first; with
    settings.return_dict, HF's GenerateBeamDecoderOnlyOutput (sequences, sequences_scores and scores with
    output_scores, logits with output_logits, beam_indices). decode_graphs (default: on
    a GPU, for more than 2 new tokens): decode steps from the runner's static buffers, one CUDA graph
    on a GPU (on the CPU the same static path runs eagerly: how the tests check it)."""
    model = loaded.model
    batch, width = input_ids.shape
    num_beams, max_new, eos = settings.num_beams, settings.max_new_tokens, settings.eos_token_ids
    vocab = model.config.vocab_size
    device = model.device
    max_length = width + max_new
    params = settings.sampling
    do_sample = not params.greedy
    if do_sample:  # HF's processors come from the params, its warpers are applied here (_hf_warpers)
        from dataclasses import replace
        params = replace(params, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0)
    length_penalty, early_stopping = settings.length_penalty, settings.early_stopping

    beams_to_keep = max(2, 1 + len(eos)) * num_beams
    top_num_beam_mask = torch.cat((torch.ones(num_beams, dtype=torch.bool),
                                   torch.zeros(beams_to_keep - num_beams, dtype=torch.bool))).to(device)
    eos_tensor = torch.tensor(eos, dtype=torch.long, device=device)
    fill = output_fill_value(settings)
    running_sequences = torch.full((batch, num_beams, max_length), fill, dtype=torch.long, device=device)
    running_sequences[:, :, :width] = input_ids.to(device)[:, None, :]
    sequences = running_sequences.clone()
    running_beam_scores = torch.zeros((batch, num_beams), dtype=torch.float, device=device)
    running_beam_scores[:, 1:] = -1e9
    beam_scores = torch.full((batch, num_beams), -1e9, dtype=torch.float, device=device)
    is_sent_finished = torch.zeros((batch, num_beams), dtype=torch.bool, device=device)
    is_early_stop_heuristic_unsatisfied = torch.ones((batch, 1), dtype=torch.bool, device=device)
    running_beam_indices = torch.full((batch, num_beams, max_new), -1, dtype=torch.int32, device=device)
    beam_indices = running_beam_indices.clone()

    longest = max(map(len, prompts)) + max_new
    # a prompt's full blocks are shared by its beams and never written again; from its partial block on,
    # each beam may come to own every block (copied or appended)
    num_blocks = sum(len(p) // BLOCK_SIZE + num_beams * (-(-(len(p) + max_new) // BLOCK_SIZE) - len(p) // BLOCK_SIZE)
                     for p in prompts)
    runner = ModelRunner(model, num_blocks + 1, BLOCK_SIZE)
    pool = _Blocks(runner)
    if decode_graphs if decode_graphs is not None else (device.type == "cuda" and max_new > 2):
        runner.enable_decode_graphs([batch * num_beams], longest)

    # prefill each prompt once; its beams start as num_beams references to its blocks
    tables, logits = _prefill(runner, pool, prompts)
    logits = logits.repeat_interleave(num_beams, dim=0)
    beam_tables = []
    for table in tables:
        beam_tables += [table] + [pool.share(table) for _ in range(num_beams - 1)]

    all_scores, raw_logits = [], []
    cur_len = width
    while True:
        step = cur_len - width  # new tokens so far
        log_probs = _processed_log_probs(logits, running_sequences, prompts, holes, settings, params, width,
                                         cur_len, num_beams)
        if do_sample:
            log_probs = _hf_warpers(log_probs, settings.sampling, len(eos) + 1 if eos else 2)
        if settings.output_logits:
            raw_logits.append(logits.clone())
        if settings.output_scores:
            all_scores.append(log_probs.clone())
        log_probs = log_probs.view(batch, num_beams, vocab) + running_beam_scores[:, :, None]
        log_probs = log_probs.reshape(batch, -1)

        # top-k continuations over all beams of a prompt (HF's _get_top_k_continuations)
        if do_sample:
            topk_indices = torch.multinomial(torch.softmax(log_probs, dim=-1), num_samples=beams_to_keep)
            topk_log_probs = torch.gather(log_probs, 1, topk_indices)
            topk_log_probs, order = topk_log_probs.sort(dim=-1, descending=True)
            topk_indices = topk_indices.gather(-1, order)
        else:
            topk_log_probs, topk_indices = torch.topk(log_probs, k=beams_to_keep)
        topk_current_beam_indices = topk_indices // vocab
        topk_running_beam_indices = _gather_beams(running_beam_indices, topk_current_beam_indices)
        topk_running_sequences = _gather_beams(running_sequences, topk_current_beam_indices)
        topk_ids = topk_indices % vocab
        topk_running_sequences[:, :, cur_len] = topk_ids
        batch_offset = torch.arange(batch, device=device).view(-1, 1) * num_beams
        topk_running_beam_indices[:, :, step] = (topk_current_beam_indices + batch_offset).to(torch.int32)

        # stopping criteria: an EOS id, a stop string (HF's stop_strings), or the length limit
        hits = torch.isin(topk_ids, eos_tensor) if eos else torch.zeros_like(topk_ids, dtype=torch.bool)
        if stop_strings is not None:
            candidates = topk_running_sequences[:, :, max(0, cur_len + 1 - 4 * stop_strings.longest - 8):cur_len + 1].tolist()
            hits = hits | torch.tensor([[stop_strings.hit(c) for c in row] for row in candidates], device=device)
        if cur_len + 1 >= max_length:
            hits = torch.ones_like(hits)

        # the best num_beams unfinished continuations run on (HF's _get_running_beams_for_next_iteration)
        topk_running_log_probs = topk_log_probs + hits.to(torch.float32) * -1.0e9
        next_topk_indices = torch.topk(topk_running_log_probs, k=num_beams)[1]
        running_sequences = _gather_beams(topk_running_sequences, next_topk_indices)
        running_beam_scores = _gather_beams(topk_running_log_probs, next_topk_indices)
        running_beam_indices = _gather_beams(topk_running_beam_indices, next_topk_indices)

        # finished beams (HF's _update_finished_beams)
        did_top_num_beams_just_finish = hits & top_num_beam_mask[None, :]
        finished_log_probs = topk_log_probs / ((cur_len + 1 - width) ** length_penalty)
        beams_in_batch_are_full = torch.all(is_sent_finished, dim=-1, keepdim=True) & (early_stopping is True)
        finished_log_probs += beams_in_batch_are_full.to(torch.float32) * -1.0e9
        finished_log_probs += (~is_early_stop_heuristic_unsatisfied).to(torch.float32) * -1.0e9
        finished_log_probs += (~did_top_num_beams_just_finish) * -1.0e9
        merged_sequences = torch.cat((sequences, topk_running_sequences), dim=1)
        merged_scores = torch.cat((beam_scores, finished_log_probs), dim=1)
        merged_beam_indices = torch.cat((beam_indices, topk_running_beam_indices), dim=1)
        merged_is_sent_finished = torch.cat((is_sent_finished, did_top_num_beams_just_finish), dim=1)
        topk_merged_indices = torch.topk(merged_scores, k=num_beams)[1]
        sequences = _gather_beams(merged_sequences, topk_merged_indices)
        beam_scores = _gather_beams(merged_scores, topk_merged_indices)
        beam_indices = _gather_beams(merged_beam_indices, topk_merged_indices)
        is_sent_finished = _gather_beams(merged_is_sent_finished, topk_merged_indices)

        cur_len += 1
        # HF's _check_early_stop_heuristic
        if early_stopping == "never" and length_penalty > 0.0:
            best_hypothetical_length = max_length - width
        else:
            best_hypothetical_length = cur_len - width
        best_possible_running_score = running_beam_scores[:, :1] / (best_hypothetical_length ** length_penalty)
        worst_finished_score = torch.where(is_sent_finished, torch.min(beam_scores, dim=1, keepdim=True)[0], -1.0e9)
        is_early_stop_heuristic_unsatisfied = is_early_stop_heuristic_unsatisfied & torch.any(
            best_possible_running_score > worst_finished_score, dim=-1, keepdim=True)
        # HF's _beam_search_has_unfinished_sequences
        improvement_possible = bool(torch.any(is_early_stop_heuristic_unsatisfied))
        exists_open_beam = not (bool(torch.all(is_sent_finished)) and early_stopping is True)
        valid_continuations = not bool(torch.all(hits))
        if not (improvement_possible and exists_open_beam and valid_continuations):
            break

        # the next step: each running beam's KV is its parent's plus the token it took
        parents = running_beam_indices[:, :, step].reshape(-1).tolist()
        new_tables = [pool.share(beam_tables[p]) for p in parents]
        for table in beam_tables:
            pool.release(table)
        beam_tables = new_tables
        next_tokens = running_sequences[:, :, cur_len - 1].reshape(-1).tolist()
        copies: list[tuple[int, int]] = []
        chunks = []
        for row, (table, token) in enumerate(zip(beam_tables, next_tokens)):
            position = len(prompts[row // num_beams]) + step
            pool.writable(table, position, copies)
            chunks.append(SeqChunk([token], position, table))
        _copy_blocks(runner, copies)
        logits = runner.run(chunks).float()

    n = settings.num_return_sequences
    sequences = sequences[:, :n].reshape(batch * n, max_length)
    beam_indices = beam_indices[:, :n].reshape(batch * n, max_new)
    generated = int(((beam_indices + 1).bool()).sum(dim=1).max())
    sequences = sequences[:, :width + generated].to(input_ids.device)
    if not settings.return_dict:
        return sequences
    out = input_ids.device
    return beam_output(sequences=sequences,
                       sequences_scores=beam_scores[:, :n].reshape(-1).to(out) if settings.output_scores else None,
                       scores=tuple(s.to(out) for s in all_scores) if settings.output_scores else None,
                       logits=tuple(s.to(out) for s in raw_logits) if settings.output_logits else None,
                       beam_indices=beam_indices[:, :generated].to(out))


def beam_output(**fields):
    """transformers' GenerateBeamDecoderOnlyOutput when transformers is installed (what HF returns), else
    a plain object with the same fields."""
    try:
        from transformers.generation import GenerateBeamDecoderOnlyOutput
    except ImportError:
        from types import SimpleNamespace
        return SimpleNamespace(attentions=None, hidden_states=None, cache=None, **fields)
    return GenerateBeamDecoderOnlyOutput(**fields)


def _prefill(runner: ModelRunner, pool: _Blocks, prompts: list[list[int]]) -> tuple[list[list[int]], torch.Tensor]:
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


def _hf_warpers(scores: torch.Tensor, p, min_keep: int) -> torch.Tensor:
    """HF's sampling warpers in its order and arithmetic (TemperatureLogitsWarper, TopKLogitsWarper,
    TopPLogitsWarper, MinPLogitsWarper), each keeping at least min_keep tokens."""
    ninf = -float("inf")
    if p.temperature != 1.0:
        scores = scores / p.temperature
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
    return scores


def _gather_beams(tensor: torch.Tensor, beam_indices: torch.Tensor) -> torch.Tensor:
    while beam_indices.dim() < tensor.dim():
        beam_indices = beam_indices.unsqueeze(-1)
    return torch.take_along_dim(tensor, beam_indices, dim=1)


def _processed_log_probs(logits, running_sequences, prompts, holes, settings, params, width, cur_len,
                         num_beams, log_softmax: bool = True) -> torch.Tensor:
    """log_softmax of each beam's logits (log_softmax=False: the logits themselves, HF's _sample), then
    HF's processors on them: the repetition penalty (the prompt without its left padding, the masked
    tokens after it, the beam's tokens), the n-gram and bad-word bans over the whole padded row,
    min_new_tokens' EOS ban, suppress_tokens and one-token bad words (params.logit_bias)."""
    log_probs = torch.log_softmax(logits, dim=-1) if log_softmax else logits
    rows = running_sequences.shape[0] * num_beams
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


def sample_search(loaded, input_ids: torch.Tensor, prompts: list[list[int]], holes: list[tuple[int, ...]],
                  settings: gen_config.GenerationSettings, stop_strings=None, streamer=None):
    """HF's greedy / sampling loop (GenerationMixin._sample) step for step, for what the engine does not
    give: return_dict_in_generate with output_scores / output_logits. Every row runs every step, as in
    HF: a finished row is fed pad tokens (with EOS ids; without, it keeps generating) and still gets
    scores. Processors on the logits, then with do_sample HF's warpers and torch.multinomial from the
    global generator (so a torch.manual_seed gives HF's tokens), else argmax. Returns HF's
    GenerateDecoderOnlyOutput (sequences, scores, logits)."""
    model = loaded.model
    n = settings.num_return_sequences
    batch, width = input_ids.shape[0] * n, input_ids.shape[1]
    max_new, eos, pad = settings.max_new_tokens, settings.eos_token_ids, settings.fill_token_id
    vocab, device = model.config.vocab_size, model.device
    params = settings.sampling
    do_sample = not params.greedy
    if do_sample:
        from dataclasses import replace
        params = replace(params, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0)
    prompts = [p for p in prompts for _ in range(n)]
    holes = [h for h in holes for _ in range(n)]
    sequences = torch.full((batch, width + max_new), pad, dtype=torch.long, device=device)
    sequences[:, :width] = input_ids.to(device).repeat_interleave(n, dim=0)
    eos_tensor = torch.tensor(eos, dtype=torch.long, device=device)

    longest = max(map(len, prompts)) + max_new
    runner = ModelRunner(model, sum(-(-(len(p) + max_new) // BLOCK_SIZE) for p in prompts) + 1, BLOCK_SIZE)
    pool = _Blocks(runner)
    if device.type == "cuda" and max_new > 2:
        runner.enable_decode_graphs([batch], longest)
    tables, logits = _prefill(runner, pool, prompts)
    unfinished = torch.ones(batch, dtype=torch.long, device=device)
    scores, raw = [], []
    cur_len = width
    while True:
        step = cur_len - width
        next_scores = _processed_log_probs(logits, sequences[:, None, :], prompts, holes, settings, params, width,
                                           cur_len, 1, log_softmax=False)
        if do_sample:
            next_scores = _hf_warpers(next_scores, settings.sampling, 1)
        if settings.output_scores:
            scores.append(next_scores)
        if settings.output_logits:
            raw.append(logits.clone())
        if do_sample:
            next_tokens = torch.multinomial(torch.softmax(next_scores, dim=-1), num_samples=1).squeeze(1)
        else:
            next_tokens = torch.argmax(next_scores, dim=-1)
        if eos:  # HF pads finished rows only when it has an EOS stopping criterion
            next_tokens = next_tokens * unfinished + pad * (1 - unfinished)
        sequences[:, cur_len] = next_tokens
        cur_len += 1
        if streamer is not None:
            streamer.put(next_tokens.cpu())
        done = torch.isin(next_tokens, eos_tensor) if eos else torch.zeros_like(unfinished, dtype=torch.bool)
        if stop_strings is not None:  # the rows' last tokens: enough for any match's window
            rows = sequences[:, max(0, cur_len - 4 * stop_strings.longest - 8):cur_len].tolist()
            done = done | torch.tensor([stop_strings.hit(r) for r in rows], device=device)
        if cur_len >= width + max_new:
            done = torch.ones_like(done)
        unfinished = unfinished & ~done
        if not bool(unfinished.any()):
            break
        chunks, copies = [], []
        for row, (table, token) in enumerate(zip(tables, next_tokens.tolist())):
            position = len(prompts[row]) + step
            pool.writable(table, position, copies)
            chunks.append(SeqChunk([token], position, table))
        _copy_blocks(runner, copies)
        logits = runner.run(chunks).float()
    out = input_ids.device
    try:
        from transformers.generation import GenerateDecoderOnlyOutput
    except ImportError:
        from types import SimpleNamespace as GenerateDecoderOnlyOutput
    return GenerateDecoderOnlyOutput(
        sequences=sequences[:, :cur_len].to(out),
        scores=tuple(s.to(out) for s in scores) if settings.output_scores else None,
        logits=tuple(s.to(out) for s in raw) if settings.output_logits else None)
