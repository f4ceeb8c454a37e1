"""Speculative decoding inside the engine: propose, score k + 1 positions in one target forward,
verify, roll the KV back to what was accepted.

A decode sequence scheduled with 1 + k tokens feeds its last sampled token followed by k
proposals; the target's logits at those k + 1 positions go through the same processing as normal
sampling (penalties see the proposals before each position) and `spec.verify` accepts a prefix
and emits one more token. The sequence's computed length then advances by 1 + accepted; the KV
written for rejected proposals is simply overwritten later, and blocks beyond it are released.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling import process_logits
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


def lookahead(seq: Sequence, k: int, max_model_len: int) -> int:
    """Proposals worth making for seq: within k, the remaining max_tokens and the context; none for an
    n > 1 request not yet forked (its first token comes from _expand_forks, which splits it)."""
    if seq.params.n > 1 and not seq.forked:
        return 0
    remaining = seq.params.max_tokens - len(seq.output_token_ids) - 1
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


def verify_rows(logits: torch.Tensor, seqs: list[Sequence], proposals: list[list[int]],
                draft_probs: torch.Tensor | None, stop_ids: list[set[int]]) -> list[list[int]]:
    """Emitted tokens per seq (accepted proposals, then the residual or bonus token)."""
    from .spec import verify
    k_max = max(map(len, proposals))
    probs = target_probs(logits, seqs, proposals, stop_ids)
    emitted: list[list[int]] = [[] for _ in seqs]
    for greedy in (True, False):
        idx = [i for i, s in enumerate(seqs) if s.params.greedy == greedy]
        if not idx:
            continue
        drafts = torch.full((len(idx), max(k_max, 1)), -1, dtype=torch.int64)
        for r, i in enumerate(idx):
            drafts[r, :len(proposals[i])] = torch.tensor(proposals[i], dtype=torch.int64)
        num = torch.tensor([len(proposals[i]) for i in idx], dtype=torch.int32)
        sel = torch.tensor(idx, device=probs.device)
        dp = None if draft_probs is None or greedy else draft_probs[sel, :max(k_max, 1)]
        tokens, accepted = verify(drafts.to(probs.device), num.to(probs.device), probs[sel, :k_max + 1], dp,
                                  [seqs[i].generator for i in idx], greedy, num.tolist())
        for r, i in enumerate(idx):
            emitted[i] = tokens[r, :int(accepted[r]) + 1].tolist()
    return emitted
