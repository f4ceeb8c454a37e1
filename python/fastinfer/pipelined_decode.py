"""Pipelined decode inside the engine (EngineConfig.pipelined_decode): launch decode step n + 1, fed
with step n's sampled tokens still on the device, before step n's tokens are read back.

While every running sequence decodes and nothing waits, the engine keeps one step in flight: each
call launches the next step, then reads back the previous one and processes its tokens (stop checks,
detokenization) while the GPU runs. A sequence that stops at step n drops its token of step n + 1.
Only steps whose inputs and sampling do not depend on the unread tokens' values are launched ahead
(`can_pipeline`).

`can_pipeline`, `launch_decode` and `read_back` are engine.py's pipelined step; like spec_decode.py,
functions of the values they are passed (the engine's scheduler, block manager, runner): nothing
here holds state beyond the returned `InFlight` record.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .block_manager import BlockManager
from .metadata import SeqChunk
from .runner import ModelRunner
from .sampling import sample, to_device
from .scheduler import Scheduler
from .sequence import Sequence


@dataclass
class InFlight:
    """A decode step launched but not yet read back: its sequences (in row order) and their tokens."""
    seqs: list[Sequence]
    tokens: torch.Tensor       # int64 [B] on the device: the sampled tokens (the next step's input)
    host: torch.Tensor         # their copy on the host (pinned on a GPU), valid once `ready` is reached
    ready: torch.cuda.Event | None


def can_pipeline(seqs: list[Sequence], pending: int, *, scheduler: Scheduler, blocks: BlockManager,
                 max_model_len: int) -> bool:
    """Whether a decode step of seqs may be launched (and sampled) on the device while each
    still has `pending` sampled tokens the host has not seen: the step's inputs and sampling
    must not depend on their values, and none may be certain to stop before it. (The engine
    checks first that pipelining is enabled and that there is no proposer.)"""
    if scheduler.waiting:
        return False
    if len(seqs) != len(scheduler.running) or any(a is not b for a, b in zip(seqs, scheduler.running)):
        return False
    for s in seqs:
        p, out = s.params, len(s.output_token_ids) + pending
        if (s.is_finished or p.logprobs is not None or p.repetition_penalty != 1.0 or p.presence_penalty != 0.0
                or p.no_repeat_ngram_size or p.bad_words_ids or p._bad_words_token_ids or p.structured_outputs is not None
                or p.frequency_penalty != 0.0 or (p.n > 1 and not s.forked) or out < p.min_tokens
                or (pending and (out >= p.max_tokens or len(s) + pending >= max_model_len))):
            return False
    if pending:
        need = sum(blocks.blocks_needed(s, 1) for s in seqs)
        return need <= blocks.num_available
    return True


def launch_decode(seqs: list[Sequence], prev: InFlight | None, *, runner: ModelRunner,
                  blocks: BlockManager) -> InFlight:
    """Run a decode step of seqs and sample it on the device; with prev, each sequence feeds its
    token of prev (still on the device) at the position after its known tokens."""
    chunks = []
    for seq in seqs:
        if prev is not None:
            blocks.grow(seq, 1)
        start = seq.num_computed_tokens
        token = [0] if prev is not None else seq.token_slice(start, start + 1)
        chunks.append(SeqChunk(token, start, seq.block_table))
    input_ids = None
    if prev is not None:  # prev's rows of these sequences (some of prev's may have stopped)
        input_ids = prev.tokens
        if len(seqs) != len(prev.seqs):
            row = {id(s): i for i, s in enumerate(prev.seqs)}
            input_ids = prev.tokens[to_device([row[id(s)] for s in seqs], torch.long, prev.tokens.device)]
    logits = runner.run(chunks, input_ids=input_ids)
    # the output position being sampled: prev's token (in flight) is not in output_token_ids yet
    in_flight = 1 if prev is not None else 0
    tokens = sample(logits, [s.params for s in seqs], [[] for _ in seqs], [s.output_token_ids for s in seqs],
                    None, [s.generator for s in seqs], [len(s.output_token_ids) + in_flight for s in seqs])
    for seq in seqs:
        seq.num_computed_tokens += 1
    if tokens.device.type == "cuda":
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(tokens.device))  # the copy's stream, not the current device's
    else:
        host, ready = tokens, None
    return InFlight(seqs, tokens, host, ready)


def read_back(cur: InFlight, *, append_token: Callable[[Sequence, int], None],
              blocks: BlockManager) -> set[str]:
    """Wait for cur's tokens on the host and append each to its sequence (append_token: the
    engine's, which checks stops); returns the ids of the requests this step advanced, not those
    whose sequences all stopped (or were aborted) after it was launched."""
    if cur.ready is not None:
        cur.ready.synchronize()
    touched = set()
    for seq, tok in zip(cur.seqs, cur.host.tolist()):
        if seq.is_finished:
            continue  # stopped (or aborted) after this step was launched
        touched.add(seq.request_id)
        append_token(seq, tok)
        if not seq.is_finished:
            blocks.register_full_blocks(seq)
    return touched
