"""Scheduler: which sequences run this step, and how many tokens each feeds.

Per step, within ``max_num_batched_tokens`` tokens and ``max_num_seqs`` sequences:
1. running sequences first, oldest first: a decode feeds one token, an unfinished prefill feeds the
   next chunk that fits the budget; when blocks run out the newest running sequence is preempted
   (its blocks freed, its tokens recomputed later: preemption by recompute);
2. then waiting sequences in arrival order (preempted ones first), each feeding as much of its
   prompt as the remaining budget allows (chunked prefill), admitted only if its blocks fit.
A sequence still computing its prompt logprobs returns a logits row per token (fp32 [tokens, vocab]:
4 GB for 8192 tokens of a 128k vocabulary), so such sequences feed at most PROMPT_LOGPROBS_ROWS tokens
per step between them (chunked further; the others are not limited by it).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .block_manager import BlockManager
from .sequence import Sequence, SeqStatus

PROMPT_LOGPROBS_ROWS = 1024  # all-row logits per step (sequences computing their prompt logprobs)


@dataclass(slots=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    num_tokens: int


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.blocks = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.lookahead = lambda seq: 0  # speculative proposals a decode step may add (engine sets it)
        # a Phi-3 LongRoPE model's original_max_position_embeddings (engine sets it; 0: none): a sequence whose
        # cached KV is short-rotated is recomputed whole once it would feed that position (rope_switch_due)
        self.rope_restart_from = 0
        self.num_rope_restarts = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.config.max_num_batched_tokens
        preemptions_before = self.num_preemptions
        scheduled: list[ScheduledSeq] = []
        logit_rows = PROMPT_LOGPROBS_ROWS
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if self.rope_switch_due(seq):
                self._restart(seq)  # recomputed from the waiting queue's front, with the long factors
                continue
            num = seq.num_uncomputed_tokens
            if num == 1:
                num += self.lookahead(seq)
            num = min(num, budget)
            if seq.needs_prompt_logprobs:
                num = min(num, logit_rows)
                if num == 0:  # this step's all-row logits are spent: it continues next step
                    i += 1
                    continue
                logit_rows -= num
            while not self.blocks.can_grow(seq, num):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                self.blocks.grow(seq, num)
                scheduled.append(ScheduledSeq(seq, num))
                budget -= num
                i += 1
                continue
            break  # seq itself was preempted: nothing after it remains
        if self.num_preemptions != preemptions_before:
            return scheduled  # memory is short: admitting more would only be preempted again
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if self.rope_restart_from and len(seq) > self.rope_restart_from:
                # computed past it from scratch (a preempted or restarted sequence, an n > 1 child that waited
                # for room): HF's Phi-3 would have recomputed it whole with the long factors by now
                seq.rope_prompt_len = max(seq.rope_prompt_len, len(seq))
            cap = logit_rows if seq.needs_prompt_logprobs else budget
            if cap == 0:
                break
            num = min(len(seq), budget, cap)  # an upper bound: prefix hits lower it
            if not self.blocks.can_allocate(seq, num):
                break
            self.waiting.popleft()
            self.blocks.allocate(seq, 0)
            num = min(seq.num_uncomputed_tokens, budget, cap)
            if seq.needs_prompt_logprobs:
                logit_rows -= num
            self.blocks.grow(seq, num)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSeq(seq, num))
            budget -= num
        return scheduled

    def rope_switch_due(self, seq: Sequence) -> bool:
        """Whether seq's next token sits at a Phi-3 LongRoPE model's original length or past it while its
        cached KV was rotated with the short factors (HF's Phi-3 generate recomputes the cache there)."""
        limit = self.rope_restart_from
        return bool(limit) and seq.rope_prompt_len <= limit < seq.num_computed_tokens + 1

    def _restart(self, seq: Sequence) -> None:
        """seq's KV recomputed whole with the long factors: as a preemption (blocks freed, seq at the waiting
        queue's front), its prompt length for the rotary choice now its length."""
        self._preempt(seq, count=False)
        self.num_rope_restarts += 1

    def _preempt(self, seq: Sequence, count: bool = True) -> None:
        """Free seq's blocks; it re-enters the waiting queue at the front and is recomputed. count: a
        preemption (memory ran short), not a LongRoPE restart."""
        self.running.remove(seq)
        self.blocks.free_seq(seq)
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += count

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free_seq(seq)
        seq.status = SeqStatus.FINISHED
