"""HF's greedy / sampling loop (GenerationMixin._sample, 5.x) for fastinfer.generate when per-step
scores are asked for (return_dict_in_generate with output_scores / output_logits): every row runs every
step as in HF, which the engine (finished rows stop) does not. Shares hf_decoding.py with beam_search.py."""
from __future__ import annotations

import torch

from . import gen_config, hf_hooks, hf_processors
from .hf_decoding import (BLOCK_SIZE, Blocks, copy_blocks, decode_chunk, hf_output, hf_warpers, prefill, processed_scores,
                          processor_params)
from .runner import ModelRunner


def sample_search(loaded, input_ids: torch.Tensor, prompts: list[list[int]], holes: list[tuple[int, ...]],
                  settings: gen_config.GenerationSettings, stop_strings=None, streamer=None):
    """HF's greedy / sampling loop (GenerationMixin._sample) step for step, for what the engine does not
    give: return_dict_in_generate with output_scores / output_logits. Every row runs every step, as in
    HF: a finished row is fed pad tokens (with EOS ids; without, it keeps generating) and still gets
    scores. Processors on the logits, then with do_sample HF's warpers and torch.multinomial from the
    global generator (so a torch.manual_seed gives HF's tokens), else argmax. Returns HF's
    GenerateDecoderOnlyOutput (sequences, scores, logits). Also the loop of generate()'s logits_processor /
    stopping_criteria / prefix_allowed_tokens_fn / max_time (hf_hooks.py), which see HF's padded rows."""
    model = loaded.model
    n = settings.num_return_sequences
    batch, width = input_ids.shape[0] * n, input_ids.shape[1]
    max_new, eos, pad = settings.max_new_tokens, settings.eos_token_ids, settings.fill_token_id
    device = model.device
    do_sample = not settings.sampling.greedy
    params = processor_params(settings.sampling)  # HF's processors; with do_sample its warpers: hf_warpers
    prompts = [p for p in prompts for _ in range(n)]
    holes = [h for h in holes for _ in range(n)]
    sequences = torch.full((batch, width + max_new), pad, dtype=torch.long, device=device)
    sequences[:, :width] = input_ids.to(device).repeat_interleave(n, dim=0)
    eos_tensor = torch.tensor(eos, dtype=torch.long, device=device)
    stops = hf_hooks.stops_for(settings)
    # HF pads finished rows when some stopping criterion has an eos_token_id (its EosTokenCriteria, or a custom one)
    pads_finished = bool(eos) or any(hasattr(c, "eos_token_id") for c in settings.stopping_criteria)
    hooked = hf_hooks.processes(settings)

    longest = max(map(len, prompts)) + max_new
    runner = ModelRunner(model, sum(-(-(len(p) + max_new) // BLOCK_SIZE) for p in prompts) + 1, BLOCK_SIZE)
    pool = Blocks(runner)
    if device.type == "cuda" and max_new > 2:
        runner.enable_decode_graphs([batch], longest)
    tables, logits = prefill(runner, pool, prompts)
    if hooked:  # a normal tensor (not an inference one) that the caller's processors may edit in place, as HF's
        logits = logits.clone()
    unfinished = torch.ones(batch, dtype=torch.long, device=device)
    scores, raw = [], []
    cur_len = width
    while True:
        step = cur_len - width
        next_scores = processed_scores(logits, sequences[:, None, :], prompts, holes, settings, params, width,
                                       cur_len, 1, log_softmax=False)
        if hooked:  # a prompt's n samples are one group of HF's prefix constraint
            next_scores = hf_hooks.process(settings, sequences[:, :cur_len], next_scores, n, width)
        if do_sample:
            next_scores = hf_warpers(next_scores, settings.sampling, 1, settings.warpers)
        next_scores = hf_processors.renormalize(settings, next_scores)
        if settings.output_scores:
            scores.append(next_scores)
        if settings.output_logits:
            raw.append(logits.clone())
        if do_sample:
            next_tokens = torch.multinomial(torch.softmax(next_scores, dim=-1), num_samples=1).squeeze(1)
        else:
            next_tokens = torch.argmax(next_scores, dim=-1)
        if pads_finished:  # HF pads finished rows only when it has an EOS stopping criterion
            next_tokens = next_tokens * unfinished + pad * (1 - unfinished)
        sequences[:, cur_len] = next_tokens
        cur_len += 1
        if streamer is not None:
            streamer.put(next_tokens.cpu())
        done = torch.isin(next_tokens, eos_tensor) if eos else torch.zeros_like(unfinished, dtype=torch.bool)
        if stop_strings is not None:  # the rows' last tokens: enough for any match's window
            rows = sequences[:, max(0, cur_len - 4 * stop_strings.longest - 8):cur_len].tolist()
            done = done | torch.tensor([stop_strings.hit(r) for r in rows], device=device)
        if stops is not None:
            done = done | stops(sequences[:, :cur_len], tuple(scores) if settings.output_scores else None)
        if cur_len >= width + max_new:
            done = torch.ones_like(done)
        unfinished = unfinished & ~done
        if not bool(unfinished.any()):
            break
        chunks, copies = [], []
        for row, (table, token) in enumerate(zip(tables, next_tokens.tolist())):
            position = len(prompts[row]) + step
            pool.writable(table, position, copies)
            chunks.append(decode_chunk(runner, token, position, table, prompts[row],
                                       lambda row=row: sequences[row, width:cur_len].tolist()))
        copy_blocks(runner, copies)
        logits = runner.run(chunks).float()
        if hooked:
            logits = logits.clone()
    out = input_ids.device
    return hf_output("GenerateDecoderOnlyOutput", sequences=sequences[:, :cur_len].to(out),
                     scores=tuple(s.to(out) for s in scores) if settings.output_scores else None,
                     logits=tuple(s.to(out) for s in raw) if settings.output_logits else None)
