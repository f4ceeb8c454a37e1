"""Attention metadata: everything a forward needs to know about the ragged batch and the paged cache.

Built once per step on the host, validated there (so the per-layer ops skip their index checks),
then moved to the device. Passed explicitly to ``forward``; there are no module-level globals.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class SeqChunk:
    """One sequence's share of a step: ``num_new`` tokens starting at ``start`` (tokens already cached)."""
    token_ids: list[int]       # the num_new tokens fed this step
    start: int                 # their first position == number of tokens already in the cache
    block_table: list[int]     # physical blocks holding positions 0 .. start + num_new - 1
    need_logits: bool = True   # False for a prefill chunk that does not reach the prompt's end
    all_logits: bool = False   # logits for every token of the chunk (prompt logprobs, perplexity)
    # LongRoPE only (rope_rows): the sequence's prompt length, its tokens at positions below it being prompt
    # tokens; None: the chunk's end (a chunk holding the whole prompt, or generated tokens only)
    prompt_len: int | None = None


def rope_rows(start: int, end: int, prompt_len: int | None, long_from: int) -> range | list[int]:
    """The cos_sin table rows of positions start .. end - 1 (models/rope.py). Without LongRoPE (long_from 0)
    the positions. With it, HF's choice made per token as if its sequence ran alone in HF: a forward over a
    sequence longer than long_from rotates with the long factors, so a prompt token takes them when the
    prompt is longer (HF's prefill is one forward), a generated token at p when p + 1 is (a decode step's
    forward); their rows are long_from + p."""
    if not long_from:
        return range(start, end)
    length = end if prompt_len is None else prompt_len
    if length > long_from:  # every token of the chunk is long
        return range(long_from + start, long_from + end)
    split = min(max(start, long_from), end)  # positions below long_from short, from it on long
    return [*range(start, split), *range(long_from + split, long_from + end)]


@dataclass(slots=True)
class AttnMetadata:
    input_ids: torch.Tensor       # int64 [num_tokens]
    positions: torch.Tensor       # int64 [num_tokens]: each token's cos_sin row, its position (LongRoPE: rope_rows)
    slot_mapping: torch.Tensor    # int64 [num_tokens]; block * block_size + offset
    cu_seqlens_q: torch.Tensor    # int32 [batch + 1]
    seq_lens: torch.Tensor        # int32 [batch]; context length after this step
    block_tables: torch.Tensor    # int32 [batch, max_blocks]; unused entries are 0
    logits_indices: torch.Tensor  # int64 [num_logits]; rows of the hidden state that need logits
    is_decode: bool               # every sequence feeds exactly one token
    logits_all_rows: bool = False  # logits_indices is arange(num_tokens): every row, in order
    # int32 zeros [>= batch * num_heads] for paged_decode_attention's fused split merge (the decode
    # graphs' static buffer, or the runner's for eager steps), or None: a merge kernel per layer
    decode_semaphores: torch.Tensor | None = None

    @classmethod
    def build(cls, chunks: list[SeqChunk], block_size: int, num_blocks: int, max_position: int,
              device: torch.device | str = "cpu", vocab_size: int | None = None,
              rope_long_from: int = 0) -> "AttnMetadata":
        """rope_long_from: ModelConfig.rope_long_from (LongRoPE's original_max_position_embeddings, else 0)."""
        if not chunks:
            raise ValueError("a step needs at least one sequence")
        if vocab_size is not None:  # the embedding kernel runs unchecked: ids are checked here, on the host
            bad = next((t for c in chunks for t in c.token_ids if not 0 <= t < vocab_size), None)
            if bad is not None:
                raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab_size})")
        input_ids, positions, slots, cu, lens, logits_idx = [], [], [], [0], [], []
        max_blocks = max(len(c.block_table) for c in chunks)
        tables = torch.zeros(len(chunks), max(max_blocks, 1), dtype=torch.int32)
        for b, c in enumerate(chunks):
            n, end = len(c.token_ids), c.start + len(c.token_ids)
            if n == 0:
                raise ValueError(f"sequence {b} feeds no tokens")
            if end > max_position:
                raise ValueError(f"sequence {b} reaches position {end - 1}, beyond the model's {max_position} positions")
            if end > len(c.block_table) * block_size:
                raise ValueError(f"sequence {b} needs {end} slots but its block table holds "
                                 f"{len(c.block_table)} blocks of {block_size}")
            if any(not 0 <= blk < num_blocks for blk in c.block_table):
                raise ValueError(f"sequence {b}'s block table has a block outside [0, {num_blocks})")
            pos = range(c.start, end)
            input_ids += c.token_ids
            positions += rope_rows(c.start, end, c.prompt_len, rope_long_from)
            slots += [c.block_table[p // block_size] * block_size + p % block_size for p in pos]
            cu.append(cu[-1] + n)
            lens.append(end)
            tables[b, :len(c.block_table)] = torch.tensor(c.block_table, dtype=torch.int32)
            if c.all_logits:
                logits_idx += range(cu[-2], cu[-1])
            elif c.need_logits:
                logits_idx.append(cu[-1] - 1)
        def to(x, dtype):
            return torch.tensor(x, dtype=dtype).to(device, non_blocking=True)
        return cls(
            input_ids=to(input_ids, torch.int64), positions=to(positions, torch.int64),
            slot_mapping=to(slots, torch.int64), cu_seqlens_q=to(cu, torch.int32),
            seq_lens=to(lens, torch.int32), block_tables=tables.to(device, non_blocking=True),
            logits_indices=to(logits_idx, torch.int64),
            is_decode=all(len(c.token_ids) == 1 for c in chunks),
            logits_all_rows=len(logits_idx) == len(input_ids),  # increasing and distinct: arange
        )

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]
