"""Paged KV block manager with prefix caching.

Blocks are in exactly one of three states: free (no content worth keeping), cached (ref count 0
but holding a full block whose chained hash is registered, reusable by a later prompt, evicted LRU
first when free blocks run out) and in use (ref count > 0). free + cached + in use == total always.

The hash of block i chains the hash of block i - 1 with block i's tokens, so a hit on block i
implies the whole prefix matches. A prompt's last token is never served from the cache (its logits
are needed), so at most (len - 1) // block_size leading blocks hit.

Sliding-window models (window > 0: every layer's attention sees only its last `window` keys) release a
running sequence's leading blocks once no query of it can read them again: the blocks wholly below
(next position - window + 1) rounded down to RELEASE_ALIGN (the largest key tile an attention kernel
rounds a window's start down to). Their table entries stay as they were (never read, so any valid id
does); seq.num_released_blocks counts them, and only the entries after it hold references.
"""
from __future__ import annotations

from collections import OrderedDict

from .sequence import Sequence


RELEASE_ALIGN = 128  # keys: the sm_90a prefill's key tile (decode kernels round to 64, the CPU not at all)


def chain_hash(prev: int | tuple | None, tokens: list[int]) -> int:
    return hash((prev, tuple(tokens)))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, window: int = 0,
                 rope_long_from: int = 0):
        """window > 0: release blocks below every sequence's sliding window (the module docstring).
        rope_long_from: a LongRoPE model's ModelConfig.rope_long_from; the KV of a sequence whose prompt is
        longer was rotated with the long factors from its first token (metadata.rope_rows), so its blocks
        hash in a chain of their own."""
        self.rope_long_from = rope_long_from
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.window = window
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out 0, 1, 2, ...
        self.cached: OrderedDict[int, None] = OrderedDict()        # ref 0, hashed; LRU order
        self.hash_to_block: dict[int, int] = {}
        self.num_prefix_queries = 0   # prompt blocks looked up
        self.num_prefix_hits = 0      # of which served from the cache

    # ---- accounting ------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_cached(self) -> int:
        return len(self.cached)

    @property
    def num_in_use(self) -> int:
        return sum(1 for r in self.ref_counts if r > 0)

    @property
    def num_available(self) -> int:
        return len(self.free) + len(self.cached)

    @property
    def prefix_hit_rate(self) -> float:
        return self.num_prefix_hits / self.num_prefix_queries if self.num_prefix_queries else 0.0

    def check_invariants(self) -> None:
        assert self.num_free + self.num_cached + self.num_in_use == self.num_blocks, \
            (self.num_free, self.num_cached, self.num_in_use, self.num_blocks)
        assert all(self.ref_counts[b] == 0 for b in self.free)
        assert all(self.ref_counts[b] == 0 and self.block_hash[b] is not None for b in self.cached)

    # ---- allocation ------------------------------------------------------------------------------
    def _take_block(self) -> int:
        if self.free:
            block = self.free.pop()
        else:  # evict the least recently used cached block
            block, _ = self.cached.popitem(last=False)
            self._unregister(block)
        self.ref_counts[block] = 1
        return block

    def _unregister(self, block: int) -> None:
        h = self.block_hash[block]
        if h is not None and self.hash_to_block.get(h) == block:
            del self.hash_to_block[h]
        self.block_hash[block] = None

    def _prefix_hits(self, seq: Sequence) -> list[int]:
        """Cached blocks holding the longest reusable prefix of seq's tokens (none for a sequence that still
        needs its prompt logprobs: cached tokens would get no logits)."""
        if not self.enable_prefix_caching or seq.needs_prompt_logprobs:
            return []
        tokens, bs, hits, h = seq.all_token_ids, self.block_size, [], self._chain_root(seq)
        for i in range((len(tokens) - 1) // bs):
            h = chain_hash(h, tokens[i * bs:(i + 1) * bs])
            block = self.hash_to_block.get(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def _chain_root(self, seq: Sequence) -> tuple | None:
        """What a sequence's first block hash chains from: None, or for a LongRoPE prompt past
        rope_long_from a marker (its cached KV differs from a shorter prompt's of the same tokens)."""
        return ("long rope",) if self.rope_long_from and seq.rope_prompt_len > self.rope_long_from else None

    def _released_before(self, num_computed: int) -> int:
        """Leading blocks of a sequence with num_computed tokens in the cache that no later query reads (0
        without a window)."""
        if not self.window:
            return 0
        return max(0, num_computed - self.window + 1) // RELEASE_ALIGN * RELEASE_ALIGN // self.block_size

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Room to place seq's cached prefix plus num_tokens new tokens (prefix hits below its sliding window
        are not taken: they stay in the cache, unreferenced)."""
        hits = self._prefix_hits(seq)
        skip = self._released_before(len(hits) * self.block_size)
        reusable_free = sum(1 for b in hits[skip:] if self.ref_counts[b] == 0)  # taken out of `cached`
        num_tokens = min(num_tokens, len(seq) - len(hits) * self.block_size)  # the cached prefix is not recomputed
        needed = seq.num_blocks_for(len(hits) * self.block_size + num_tokens, self.block_size) - len(hits)
        return needed <= self.num_available - reusable_free

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Give a waiting seq its prefix hits and blocks for its first num_tokens computed tokens.
        Sets seq.num_computed_tokens to the number of tokens served from the cache."""
        assert not seq.block_table
        hits = self._prefix_hits(seq)
        if self.enable_prefix_caching and not seq.needs_prompt_logprobs:  # (such a sequence does not look)
            self.num_prefix_queries += (len(seq) - 1) // self.block_size
            self.num_prefix_hits += len(hits)
        skip = self._released_before(len(hits) * self.block_size)  # below the window: never read, not taken
        for i, block in enumerate(hits):
            if i >= skip:
                if self.ref_counts[block] == 0:
                    del self.cached[block]
                self.ref_counts[block] += 1
            seq.block_table.append(block)
            seq.block_hashes.append(self.block_hash[block])
        seq.num_hashed_blocks = len(hits)
        seq.num_released_blocks = skip
        seq.num_computed_tokens = len(hits) * self.block_size
        if not seq.admitted:  # the first admission's prompt hits; a recompute's hits on its own output are not
            seq.admitted = True
            seq.num_prefix_hit_tokens = min(seq.num_computed_tokens, len(seq.prompt_token_ids))
        self.grow(seq, num_tokens)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """New blocks seq needs to compute num_tokens more tokens."""
        total = seq.num_blocks_for(seq.num_computed_tokens + num_tokens, self.block_size)
        return max(0, total - len(seq.block_table))

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= self.num_available

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        for _ in range(self.blocks_needed(seq, num_tokens)):
            seq.block_table.append(self._take_block())

    def trim(self, seq: Sequence) -> None:
        """Release blocks past seq's computed tokens (speculative slots that were rejected)."""
        keep = max(seq.num_blocks_for(seq.num_computed_tokens, self.block_size), seq.num_hashed_blocks)
        while len(seq.block_table) > keep:
            block = seq.block_table.pop()
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self._unregister(block)
                self.free.append(block)

    def can_fork(self, parent: Sequence) -> bool:
        """Room for fork(parent, ...): it takes a new block when the parent has one past its full ones."""
        return parent.num_computed_tokens // self.block_size >= len(parent.block_table) or self.num_available >= 1

    def fork(self, parent: Sequence, child: Sequence) -> int | None:
        """Child shares parent's full blocks. Returns the parent's partial last block, which the
        caller copies into the child's own new last block (copy on write); None if there is none."""
        full = parent.num_computed_tokens // self.block_size
        for block in parent.block_table[parent.num_released_blocks:full]:
            self.ref_counts[block] += 1
        child.block_table = parent.block_table[:full]
        child.num_released_blocks = parent.num_released_blocks
        child.block_hashes = parent.block_hashes[:parent.num_hashed_blocks]
        child.num_hashed_blocks = parent.num_hashed_blocks
        child.num_computed_tokens = parent.num_computed_tokens
        if full < len(parent.block_table):
            child.block_table.append(self._take_block())
            return parent.block_table[full]
        return None

    def register_full_blocks(self, seq: Sequence) -> None:
        """Record the hashes of seq's newly completed blocks, so later prompts can reuse them; then, with
        a sliding window, release the blocks no query of seq reads again (after a step's tokens are in)."""
        self._register(seq)
        if self.window:
            self._release_below_window(seq)

    def _release_below_window(self, seq: Sequence) -> None:
        # one position back: in pipelined decode num_computed_tokens already counts a step in flight, whose
        # query sits at num_computed_tokens - 1 (pipelined_decode.py)
        upto = min(self._released_before(seq.num_computed_tokens - 1), len(seq.block_table))
        if self.enable_prefix_caching:
            upto = min(upto, seq.num_hashed_blocks)  # a block is registered before it goes
        for i in range(seq.num_released_blocks, upto):
            self._drop(seq.block_table[i])
        seq.num_released_blocks = max(seq.num_released_blocks, upto)

    def _drop(self, block: int) -> None:
        """One reference to block less: at none, it is cached (hashed) or free."""
        self.ref_counts[block] -= 1
        assert self.ref_counts[block] >= 0
        if self.ref_counts[block] == 0:
            if self.block_hash[block] is not None:
                self.cached[block] = None  # most recent
            else:
                self.free.append(block)

    def _register(self, seq: Sequence) -> None:
        if not self.enable_prefix_caching:
            return
        full, bs = seq.num_computed_tokens // self.block_size, self.block_size
        while seq.num_hashed_blocks < full:
            i = seq.num_hashed_blocks
            prev = seq.block_hashes[i - 1] if i else self._chain_root(seq)
            h = chain_hash(prev, seq.token_slice(i * bs, (i + 1) * bs))
            block = seq.block_table[i]
            if h not in self.hash_to_block and self.block_hash[block] is None:
                self.hash_to_block[h] = block
                self.block_hash[block] = h
            seq.block_hashes.append(h)
            seq.num_hashed_blocks += 1

    def free_seq(self, seq: Sequence) -> None:
        """Release seq's blocks (last first, so a prompt's tail is evicted before its head); the entries it
        released already hold no reference."""
        for block in reversed(seq.block_table[seq.num_released_blocks:]):
            self._drop(block)  # a prompt's head, dropped last, outlives its tail in the cache
        seq.block_table = []
        seq.num_released_blocks = 0
        seq.block_hashes = []
        seq.num_hashed_blocks = 0
        seq.num_computed_tokens = 0
        seq.draft_computed = 0  # the draft model's KV lived in the same blocks
