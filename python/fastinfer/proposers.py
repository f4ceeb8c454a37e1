"""Speculative-decoding proposers: n-gram prompt lookup and a small draft model.

A proposer suggests up to k next tokens per sequence; the target model scores them all in one
forward and `spec.verify` keeps the longest acceptable prefix (rejection sampling, so the output
distribution is the target's).
"""
from __future__ import annotations

import torch

from .metadata import SeqChunk
from .runner import ModelRunner
from .sampling import draw, process_logits
from .sequence import Sequence


class NgramProposer:
    """Prompt lookup: find the most recent earlier occurrence of the sequence's last n tokens
    (n from max_n down to min_n) and propose the tokens that followed it."""

    has_probs = False

    def __init__(self, num_tokens: int, min_n: int = 1, max_n: int = 4):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"speculative ngram sizes need 1 <= prompt_lookup_min <= prompt_lookup_max, got {min_n}, {max_n}")
        self.k, self.min_n, self.max_n = num_tokens, min_n, max_n

    def propose(self, seqs: list[Sequence], ks: list[int],
                stop_ids: list[set[int]] | None = None) -> tuple[list[list[int]], None]:
        return [self._lookup(s.all_token_ids, k) for s, k in zip(seqs, ks)], None

    def _lookup(self, tokens: list[int], k: int) -> list[int]:
        if k <= 0:
            return []
        for n in range(min(self.max_n, len(tokens) - 1), self.min_n - 1, -1):
            tail = tokens[-n:]
            for start in range(len(tokens) - n - 1, -1, -1):  # most recent match first
                if tokens[start:start + n] == tail:
                    return tokens[start + n:start + n + k]
        return []

    def rollback(self, seq: Sequence) -> None:
        pass

    def release(self, seq: Sequence) -> None:
        pass


class DraftModelProposer:
    """A smaller model with the same tokenizer proposes k tokens autoregressively. Its KV cache
    mirrors the target's paged layout and uses the same block tables (same block ids), so the
    engine's block manager serves both; `seq.draft_computed` counts the draft's cached tokens."""

    has_probs = True

    def __init__(self, draft_model, num_tokens: int, num_blocks: int, block_size: int):
        self.k = num_tokens
        self.runner = ModelRunner(draft_model, num_blocks, block_size)

    def propose(self, seqs: list[Sequence], ks: list[int],
                stop_ids: list[set[int]] | None = None) -> tuple[list[list[int]], torch.Tensor]:
        """Proposals per seq and the draft's processed probabilities, fp32 [B, max k, V]. stop_ids[i]:
        seq i's stop tokens, suppressed while its output (with the proposals so far) is shorter than
        min_tokens, as the target suppresses them (spec_decode.target_probs): a proposal the target
        cannot draw is never made."""
        proposals: list[list[int]] = [[] for _ in seqs]
        probs: list[list[torch.Tensor]] = [[] for _ in seqs]
        for step in range(max(ks, default=0)):
            live = [i for i, k in enumerate(ks) if k > step]
            chunks = []
            for i in live:
                s = seqs[i]
                tokens = s.all_token_ids + proposals[i]
                start = s.draft_computed
                chunks.append(SeqChunk(tokens[start:], start, list(s.block_table), prompt_len=s.rope_prompt_len))
                s.draft_computed = len(tokens)
            logits = self.runner.run(chunks)
            rows = [seqs[i] for i in live]
            seen = [list(s.extra_seen_ids) + s.all_token_ids + proposals[i] for s, i in zip(rows, live)]
            outs = [s.output_token_ids + proposals[i] for s, i in zip(rows, live)]
            params = [s.params for s in rows]
            suppress = [sorted(stop_ids[i]) if stop_ids is not None and len(out) < s.params.min_tokens else []
                        for s, i, out in zip(rows, live, outs)]
            # a seeded sequence proposes position t with its own TokenStream noise of t, the draw the target
            # samples t with (spec_decode.coupled_verify); the rest use the default generator
            gens = [s.generator for s in rows]
            processed = process_logits(logits, params, seen, outs, suppress)
            p = torch.softmax(processed, dim=-1)
            tokens = draw(processed, params, gens, [len(out) for out in outs], p).tolist()
            for j, i in enumerate(live):
                proposals[i].append(tokens[j])
                probs[i].append(p[j])
        vocab = self.runner.model.config.vocab_size
        k_max = max(ks, default=0)
        out = torch.zeros(len(seqs), max(k_max, 1), vocab, device=self.runner.device)
        for i, rows in enumerate(probs):
            if rows:
                out[i, :len(rows)] = torch.stack(rows)
        return proposals, out

    def release(self, seq: Sequence) -> None:
        """seq has finished (or was aborted): nothing is kept per sequence (its cache is the target's blocks)."""

    def rollback(self, seq: Sequence) -> None:
        """The draft's cache is valid only up to what the target accepted."""
        seq.draft_computed = min(seq.draft_computed, seq.num_computed_tokens)


def make_proposer(spec: dict, num_blocks: int, block_size: int, device, dtype):
    method = spec.get("method")
    k = spec.get("num_tokens", spec.get("num_speculative_tokens"))
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"speculative num_tokens must be an integer >= 1, got {k!r}")
    if method == "ngram":
        return NgramProposer(k, spec.get("prompt_lookup_min", 1), spec.get("prompt_lookup_max", 4))
    if method == "draft":
        from .generate import get_loaded
        if "model" not in spec:
            raise ValueError("speculative method 'draft' needs a 'model'")
        draft = get_loaded(spec["model"], dtype, device, cache=False).model
        return DraftModelProposer(draft, k, num_blocks, block_size)
    raise ValueError(f"speculative method must be 'ngram' or 'draft', got {method!r}")
