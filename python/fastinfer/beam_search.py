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

from . import gen_config, hf_hooks, hf_processors
from .hf_decoding import (BLOCK_SIZE, Blocks, copy_blocks, decode_chunk, hf_output, hf_warpers, prefill, processed_scores,
                          processor_params)
from .runner import ModelRunner

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
    do_sample = not settings.sampling.greedy
    params = processor_params(settings.sampling)  # HF's processors; with do_sample its warpers: hf_warpers
    length_penalty, early_stopping = settings.length_penalty, settings.early_stopping

    beams_to_keep = max(2, 1 + len(eos)) * num_beams
    top_num_beam_mask = torch.cat((torch.ones(num_beams, dtype=torch.bool),
                                   torch.zeros(beams_to_keep - num_beams, dtype=torch.bool))).to(device)
    eos_tensor = torch.tensor(eos, dtype=torch.long, device=device)
    stops = hf_hooks.stops_for(settings)
    hooked = hf_hooks.processes(settings)
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
    pool = Blocks(runner)
    if decode_graphs if decode_graphs is not None else (device.type == "cuda" and max_new > 2):
        runner.enable_decode_graphs([batch * num_beams], longest)

    # prefill each prompt once; its beams start as num_beams references to its blocks
    tables, logits = prefill(runner, pool, prompts)
    logits = logits.repeat_interleave(num_beams, dim=0)
    beam_tables = []
    for table in tables:
        beam_tables += [table] + [pool.share(table) for _ in range(num_beams - 1)]

    all_scores, raw_logits = [], []
    cur_len = width
    while True:
        step = cur_len - width  # new tokens so far
        log_probs = processed_scores(logits, running_sequences, prompts, holes, settings, params, width,
                                     cur_len, num_beams)
        if hooked:  # generate()'s logits_processor / prefix_allowed_tokens_fn on HF's flat running rows
            log_probs = hf_hooks.process(settings, running_sequences[:, :, :cur_len].reshape(batch * num_beams, -1),
                                         log_probs, num_beams, width)
        if do_sample:
            log_probs = hf_warpers(log_probs, settings.sampling, len(eos) + 1 if eos else 2, settings.warpers)
        log_probs = hf_processors.renormalize(settings, log_probs)
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
        if stops is not None:  # generate()'s stopping_criteria / max_time on the flat candidates, as HF
            flat = topk_running_sequences[:, :, :cur_len + 1].reshape(batch * beams_to_keep, -1)
            hits = hits | stops(flat, tuple(all_scores) if settings.output_scores else None).view(batch, beams_to_keep)
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
            chunks.append(decode_chunk(runner, token, position, table, prompts[row // num_beams],
                                       lambda row=row: running_sequences[row // num_beams, row % num_beams,
                                                                         width:cur_len].tolist()))
        copy_blocks(runner, copies)
        logits = runner.run(chunks).float()

    n = settings.num_return_sequences
    sequences = sequences[:, :n].reshape(batch * n, max_length)
    beam_indices = beam_indices[:, :n].reshape(batch * n, max_new)
    generated = int(((beam_indices + 1).bool()).sum(dim=1).max())
    sequences = sequences[:, :width + generated].to(input_ids.device)
    if not settings.return_dict:
        return sequences
    out = input_ids.device
    return hf_output("GenerateBeamDecoderOnlyOutput", sequences=sequences,
                     sequences_scores=beam_scores[:, :n].reshape(-1).to(out) if settings.output_scores else None,
                     scores=tuple(s.to(out) for s in all_scores) if settings.output_scores else None,
                     logits=tuple(s.to(out) for s in raw_logits) if settings.output_logits else None,
                     beam_indices=beam_indices[:, :generated].to(out))


def _gather_beams(tensor: torch.Tensor, beam_indices: torch.Tensor) -> torch.Tensor:
    while beam_indices.dim() < tensor.dim():
        beam_indices = beam_indices.unsqueeze(-1)
    return torch.take_along_dim(tensor, beam_indices, dim=1)


