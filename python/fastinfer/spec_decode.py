"""Speculative decoding inside the engine: propose, score k + 1 positions in one target forward,
verify, roll the KV back to what was accepted.

A decode sequence scheduled with 1 + k tokens feeds its last sampled token followed by k
proposals; the target's logits at those k + 1 positions go through the same processing as normal
sampling (penalties see the proposals before each position) and `spec.verify` accepts a prefix
and emits one more token. The sequence's computed length then advances by 1 + accepted; the KV
written for rejected proposals is simply overwritten later, and blocks beyond it are released.

`propose` and `verify_step` are engine.py's step around that forward; like the rest, functions of the
values they are passed (the engine's proposer, block manager, statistics): nothing here holds state.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .block_manager import BlockManager
from .sampling import TokenStream, position_noise, process_logits
from .scheduler import ScheduledSeq
from .sequence import Sequence


@dataclass
class SpecStats:
    num_steps: int = 0        # sequence-steps that verified at least one proposal
    num_proposed: int = 0
    num_accepted: int = 0
    num_emitted: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted / self.num_proposed if self.num_proposed else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens emitted per verifying step (accepted proposals + the target's own token)."""
        return self.num_emitted / self.num_steps if self.num_steps else 0.0


def lookahead(seq: Sequence, k: int, max_model_len: int, rope_restart_from: int = 0) -> int:
    """Proposals worth making for seq: within k, the remaining max_tokens and the context; none for an
    n > 1 request not yet forked (its first token comes from _expand_forks, which splits it). rope_restart_from
    (Scheduler's): a short-rotated sequence proposes no token at that position or past it (it is recomputed
    with the long factors when it gets there)."""
    if seq.params.n > 1 and not seq.forked:
        return 0
    remaining = seq.params.max_tokens - len(seq.output_token_ids) - 1
    if rope_restart_from and seq.rope_prompt_len <= rope_restart_from:
        remaining = min(remaining, rope_restart_from - len(seq))
    return max(0, min(k, remaining, max_model_len - len(seq)))


def target_probs(logits: torch.Tensor, seqs: list[Sequence], proposals: list[list[int]],
                 stop_ids: list[set[int]]) -> torch.Tensor:
    """Processed target probabilities fp32 [B, k_max + 1, V]; logits holds each seq's k_i + 1 rows."""
    params, seen, outs, suppress = [], [], [], []
    for seq, props, stops in zip(seqs, proposals, stop_ids):
        for j in range(len(props) + 1):
            out = seq.output_token_ids + props[:j]
            params.append(seq.params)
            seen.append(list(seq.extra_seen_ids) + seq.all_token_ids + props[:j])
            outs.append(out)
            suppress.append(sorted(stops) if len(out) < seq.params.min_tokens else [])
    probs = torch.softmax(process_logits(logits, params, seen, outs, suppress), dim=-1)
    k_max = max(map(len, proposals))
    padded = torch.zeros(len(seqs), k_max + 1, logits.shape[-1], device=logits.device)
    row = 0
    for i, props in enumerate(proposals):
        padded[i, :len(props) + 1] = probs[row:row + len(props) + 1]
        row += len(props) + 1
    return padded


def coupled_verify(probs: torch.Tensor, seqs: list[Sequence], proposals: list[list[int]]) -> list[list[int]]:
    """Seeded rows: the token at each output position is the sampler's own draw there, argmax(p / E)
    with E the sequence's TokenStream noise of that position, and a proposal is accepted when it
    equals that draw (emitted: the draws up to and including the first mismatch, or the bonus).
    Emitted tokens are then exactly what sampling without speculation gives, whatever the proposals
    (so whatever the batch and its token budget). For a proposal that is a point mass (n-gram) this is
    the usual rule: it is accepted with probability p(x). The draft model proposes with the same
    noise (proposers.py), argmax(q / E): a Gumbel-max coupling, exact for p but accepting less often
    than min(1, p / q) when q differs from p."""
    vocab = probs.shape[-1]
    counts = [len(props) + 1 for props in proposals]
    noise = torch.empty(sum(counts), vocab, device=probs.device)
    rows, row = [], 0
    for i, (seq, n) in enumerate(zip(seqs, counts)):
        pos0 = len(seq.output_token_ids)
        for j in range(n):
            position_noise(seq.generator, pos0 + j, noise[row + j])
        rows.extend((i, j) for j in range(n))
        row += n
    index = torch.tensor(rows, dtype=torch.long).to(probs.device)
    draws = (probs[index[:, 0], index[:, 1]] / noise).argmax(dim=-1).tolist()  # one sync for the batch
    emitted, row = [], 0
    for props, n in zip(proposals, counts):
        mine = draws[row:row + n]
        accepted = 0
        while accepted < n - 1 and mine[accepted] == props[accepted]:
            accepted += 1
        emitted.append(mine[:accepted + 1])
        row += n
    return emitted


def verify_rows(logits: torch.Tensor, seqs: list[Sequence], proposals: list[list[int]],
                draft_probs: torch.Tensor | None, stop_ids: list[set[int]]) -> list[list[int]]:
    """Emitted tokens per seq (accepted proposals, then the residual or bonus token): greedy rows by
    the longest prefix equal to the target's argmax, seeded rows by coupled_verify, the rest by the
    rejection rule of spec.verify (min(1, p / q), residual sample)."""
    from .spec import verify
    k_max = max(map(len, proposals))
    probs = target_probs(logits, seqs, proposals, stop_ids)
    emitted: list[list[int]] = [[] for _ in seqs]
    for s in seqs:
        if s.generator is not None and not isinstance(s.generator, TokenStream):
            raise TypeError(f"sequence {s.seq_id}: a seeded sequence carries a sampling.TokenStream, got "
                            f"{type(s.generator).__name__}")
    seeded = [i for i, s in enumerate(seqs) if not s.params.greedy and s.generator is not None]
    if seeded:
        sel = torch.tensor(seeded, dtype=torch.long).to(probs.device)
        for i, toks in zip(seeded, coupled_verify(probs[sel], [seqs[i] for i in seeded],
                                                  [proposals[i] for i in seeded])):
            emitted[i] = toks
    seeded_set = set(seeded)
    for greedy in (True, False):
        idx = [i for i, s in enumerate(seqs) if s.params.greedy == greedy and i not in seeded_set]
        if not idx:
            continue
        drafts = torch.full((len(idx), max(k_max, 1)), -1, dtype=torch.int64)
        for r, i in enumerate(idx):
            drafts[r, :len(proposals[i])] = torch.tensor(proposals[i], dtype=torch.int64)
        num = torch.tensor([len(proposals[i]) for i in idx], dtype=torch.int32)
        sel = torch.tensor(idx, device=probs.device)
        dp = None if draft_probs is None or greedy else draft_probs[sel, :max(k_max, 1)]
        tokens, accepted = verify(drafts.to(probs.device), num.to(probs.device), probs[sel, :k_max + 1], dp,
                                  None, greedy, num.tolist())
        for r, i in enumerate(idx):
            emitted[i] = tokens[r, :int(accepted[r]) + 1].tolist()
    return emitted


def propose(proposer, batch: list[ScheduledSeq],
            stops: Callable[[Sequence], set[int]] | None = None) -> tuple[dict[int, list[int]], torch.Tensor | None]:
    """Proposals for the decode sequences scheduled with lookahead, keyed by batch index, and the
    draft's probabilities of those kept (rows in key order; None for a proposer without them)."""
    if proposer is None:
        return {}, None
    cand = [i for i, s in enumerate(batch) if s.seq.num_uncomputed_tokens == 1 and s.num_tokens > 1]
    if not cand:
        return {}, None
    seqs = [batch[i].seq for i in cand]
    props, probs = proposer.propose(seqs, [batch[i].num_tokens - 1 for i in cand],
                                    None if stops is None else [stops(s) for s in seqs])
    keep = {i: p for i, p in zip(cand, props) if p}
    if probs is not None:
        probs = probs[torch.tensor([j for j, i in enumerate(cand) if i in keep], device=probs.device)]
    return keep, probs


def verify_step(logits: torch.Tensor, seqs: list[Sequence], proposals: list[list[int]],
                draft_probs: torch.Tensor | None, stop_ids: list[set[int]], *, blocks: BlockManager, proposer,
                append_token: Callable[[Sequence, int], None], stats: SpecStats) -> None:
    """Verify each seq's proposals (logits: its k_i + 1 rows, in order), roll its KV in the target's
    and the draft's cache back to what was accepted, and append the emitted tokens with append_token
    (which may finish the sequence: the tokens after a stop are dropped); stats counts what it took."""
    emitted = verify_rows(logits, seqs, proposals, draft_probs, stop_ids)
    for seq, prop, toks in zip(seqs, proposals, emitted):
        accepted = len(toks) - 1
        seq.num_computed_tokens += accepted  # the fed token was counted; rejected slots are dropped
        blocks.trim(seq)
        proposer.rollback(seq)
        kept = 0
        for tok in toks:
            append_token(seq, tok)
            kept += 1
            if seq.is_finished:
                break
        # statistics of what the sequence took: a stop (EOS, stop id / string) inside the run
        # discards the tokens after it, and the proposals there were never needed
        stats.num_steps += 1
        stats.num_proposed += min(len(prop), kept)
        stats.num_accepted += min(accepted, kept)
        stats.num_emitted += kept
