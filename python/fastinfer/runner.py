"""ModelRunner: owns the model and its paged KV caches, runs one step of SeqChunks."""
from __future__ import annotations

import torch

from .metadata import AttnMetadata, SeqChunk
from .models.llama import LlamaForCausalLM


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int = 16,
                 kv_cache_dtype: str | None = None):
        if block_size <= 0 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {block_size}")
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.model = model
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.kv_caches = model.make_kv_caches(num_blocks, block_size, kv_cache_dtype)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def run(self, chunks: list[SeqChunk]) -> torch.Tensor:
        """fp32 logits [number of chunks with need_logits, vocab], in chunk order."""
        meta = AttnMetadata.build(chunks, self.block_size, self.num_blocks,
                                  self.model.config.max_position_embeddings, self.device)
        return self.model.forward(meta, self.kv_caches)

    def copy_block(self, src: int, dst: int) -> None:
        """Copy one block's K and V in every layer (copy-on-write of a shared partial block)."""
        for cache in self.kv_caches:
            cache[dst].copy_(cache[src])
