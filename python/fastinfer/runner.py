"""ModelRunner: owns the model and its paged KV caches, runs one step of SeqChunks.

Decode steps (one token per sequence) can run as CUDA graphs, one per batch-size bucket: the
metadata lives in static device buffers, a step pads its batch to the next bucket (padding rows
write no KV, slot -1, and attend to one key of block 0), copies its metadata in with two
host-to-device copies and replays the graph. The decode kernels plan their work from shapes alone
(csrc/include/fastinfer/attention/decode.h), so the width of the static block table, enough for
max_model_len, fixes one plan that serves every context length. Prefill and mixed steps run eagerly.
"""
from __future__ import annotations

import weakref

import torch

from .metadata import AttnMetadata, SeqChunk, rope_rows
from .models.llama import LlamaForCausalLM


def default_graph_sizes(max_num_seqs: int) -> list[int]:
    """Batch-size buckets for decode graphs: 1, 2, 4, 8, then multiples of 16 up to max_num_seqs
    (capped at 512), the largest always covering max_num_seqs."""
    cap = min(max_num_seqs, 512)
    sizes = [b for b in (1, 2, 4, 8) if b < cap] + list(range(16, cap, 16))
    return sorted(set(sizes + [cap]))


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
        self.graphs: DecodeGraphs | None = None
        self._semaphores: torch.Tensor | None = None  # eager decode steps' split-merge semaphores (CUDA)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def enable_decode_graphs(self, sizes: list[int], max_model_len: int, capture: bool | None = None) -> None:
        """Run decode steps of up to max(sizes) sequences from static buffers, padded to a bucket.
        capture (default: on CUDA) records one CUDA graph per bucket now; without it the same static
        path runs eagerly (how the CPU tests check the padding and the buffers). A step that reads its data
        back (a MoE model's routing off the moe_gemv path, models/moe.py) cannot be a graph: only the
        buckets whose steps avoid that are kept (larger batches run the plain eager path)."""
        safe = getattr(self.model, "decode_graph_safe", lambda batch: True)
        kept = [s for s in sizes if s >= 1 and safe(s)]
        if capture is None:
            capture = self.device.type == "cuda" and bool(kept)
        if capture and self.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        if capture and len(kept) < len(sizes):
            sizes = kept
        if not sizes:
            raise ValueError(f"decode steps of these batch sizes read the step's data back (mixture-of-experts routing "
                             f"off the moe_gemv path): they cannot be captured in a CUDA graph")
        self.graphs = DecodeGraphs(self, sizes, max_model_len, capture)

    def run(self, chunks: list[SeqChunk], input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 logits [number of chunks with need_logits, vocab], in chunk order. From a graph
        replay the result is a view of a static buffer, valid until the next run.
        input_ids (decode steps only): int64 [len(chunks)] on the device, the tokens to feed in
        place of the chunks' token_ids, e.g. those the previous step sampled and the host has not
        seen yet (the engine's pipelined decode)."""
        if input_ids is not None and (len(input_ids) != len(chunks) or any(len(c.token_ids) != 1 for c in chunks)):
            raise ValueError("input_ids replaces the tokens of a decode step: one per single-token chunk")
        if self.graphs is not None and self.graphs.accepts(chunks):
            return self.graphs.run(chunks, input_ids)
        meta = AttnMetadata.build(chunks, self.block_size, self.num_blocks,
                                  self.model.config.max_position_embeddings, self.device,
                                  vocab_size=self.model.config.vocab_size,
                                  rope_long_from=self.model.config.rope_long_from)
        if input_ids is not None:
            meta.input_ids = input_ids
        if meta.is_decode:
            meta.decode_semaphores = self.decode_semaphores(len(chunks))
        return self.model.forward(meta, self.kv_caches)

    def decode_semaphores(self, batch: int) -> torch.Tensor | None:
        """Zeroed int32 semaphores for a decode step of `batch` sequences, eager or graphed (decode
        attention merges its splits in-kernel with them; every launch leaves them zero, and the steps of
        one runner never overlap, so all layers and steps share them), grown on demand; None on the
        CPU, and inside a caller's CUDA-graph capture (no allocation there: the merge kernel runs)."""
        need = batch * self.model.config.num_heads
        if self.device.type != "cuda":
            return None
        if self._semaphores is None or self._semaphores.numel() < need:
            if torch.cuda.is_current_stream_capturing():
                return None
            self._semaphores = torch.zeros(max(need, 1024), dtype=torch.int32, device=self.device)
        return self._semaphores

    def copy_block(self, src: int, dst: int) -> None:
        """Copy one block's K and V in every layer (copy-on-write of a shared partial block)."""
        for cache in self.kv_caches:
            cache[dst].copy_(cache[src])


class DecodeGraphs:
    """Static metadata buffers and, on CUDA, one captured decode graph per batch-size bucket."""

    def __init__(self, runner: ModelRunner, sizes: list[int], max_model_len: int, capture: bool):
        if not sizes or any(b < 1 for b in sizes):
            raise ValueError(f"graph batch sizes must be positive, got {sizes}")
        # a weak reference: runner.graphs -> self -> runner would be a cycle that keeps the KV caches and
        # the graph pool alive after an engine is dropped, until the cycle collector happens to run
        self.runner, self.capture = weakref.proxy(runner), capture
        self.sizes = sorted(set(sizes))
        self.max_batch = self.sizes[-1]
        self.max_len = min(max_model_len, runner.model.config.max_position_embeddings)
        self.width = -(-self.max_len // runner.block_size)  # block-table columns: max_model_len's blocks
        dev, b = runner.device, self.max_batch
        # Host staging (pinned on CUDA) -> device, three copies per step: [input_ids, positions,
        # slot_mapping] as int64 [3, b], then int32 seq_lens [b] and block tables [b, width], which
        # share one buffer (seq_lens first) so that each stays contiguous in a bucket's view.
        pin = dev.type == "cuda"
        self.host64 = torch.zeros(3, b, dtype=torch.int64, pin_memory=pin)
        self.host32 = torch.zeros(b * (1 + self.width), dtype=torch.int32, pin_memory=pin)
        self.dev64 = torch.zeros(3, b, dtype=torch.int64, device=dev)
        self.dev32 = torch.zeros(b * (1 + self.width), dtype=torch.int32, device=dev)
        self.cu_seqlens = torch.arange(b + 1, dtype=torch.int32, device=dev)
        # the runner's decode-attention semaphores, sized for the largest bucket now (not during capture);
        # the graphs keep this buffer even if eager steps later grow the runner's
        self.semaphores = runner.decode_semaphores(b)
        self.rows = torch.arange(b, dtype=torch.int64, device=dev)
        self.np64 = self.host64.numpy()  # cheap element and row writes from Python lists
        self.np_lens, self.np_tables = self._split32(self.host32.numpy())
        self.copied = torch.cuda.Event() if pin else None  # the staging buffers are free again
        # per row of np_tables: columns that may be non-zero (the rest are 0), so that a step writes
        # O(blocks in use) host entries, not rows * width (width ~ max_model_len / block_size)
        self.row_blocks = [0] * b
        self._pad(0, b)
        self.logits: torch.Tensor | None = None  # fp32 [max_batch, vocab]: every graph's output (when captured)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.num_steps = 0  # decode steps this path ran (replays when captured)
        if capture:
            self._capture()

    def _split32(self, flat):
        """(seq_lens [max_batch], block tables [max_batch, width]) views of an int32 buffer."""
        b = self.max_batch
        return flat[:b], flat[b:].reshape(b, self.width)

    def meta(self, b: int) -> AttnMetadata:
        """Views of the static buffers for a bucket of b rows."""
        lens, tables = self._split32(self.dev32)
        return AttnMetadata(input_ids=self.dev64[0, :b], positions=self.dev64[1, :b], slot_mapping=self.dev64[2, :b],
                            cu_seqlens_q=self.cu_seqlens[:b + 1], seq_lens=lens[:b], block_tables=tables[:b],
                            logits_indices=self.rows[:b], is_decode=True, logits_all_rows=True,
                            decode_semaphores=self.semaphores)

    def bucket(self, batch: int) -> int:
        return next(b for b in self.sizes if b >= batch)

    def accepts(self, chunks: list[SeqChunk]) -> bool:
        return (len(chunks) <= self.max_batch
                and all(len(c.token_ids) == 1 and c.need_logits and not c.all_logits for c in chunks))

    def _pad(self, first: int, last: int) -> None:
        """Rows first .. last - 1 are padding: token 0 at position 0, no KV write, one key of block 0."""
        self.np64[:, first:last] = 0
        self.np64[2, first:last] = -1
        self.np_lens[first:last] = 1
        dirty = max(self.row_blocks[first:last], default=0)
        if dirty:
            self.np_tables[first:last, :dirty] = 0
            self.row_blocks[first:last] = [0] * (last - first)

    def run(self, chunks: list[SeqChunk], input_ids: torch.Tensor | None = None) -> torch.Tensor:
        n, bs, nb = len(chunks), self.runner.block_size, self.runner.num_blocks
        if self.copied is not None:
            self.copied.synchronize()  # the previous step's copies have left the staging buffers
        np64, lens, tables, widest = self.np64, self.np_lens, self.np_tables, 0
        vocab, long_from = self.runner.model.config.vocab_size, self.runner.model.config.rope_long_from
        for i, c in enumerate(chunks):
            table, p = c.block_table, c.start
            if input_ids is None and not 0 <= c.token_ids[0] < vocab:  # the embedding kernel runs unchecked
                raise ValueError(f"token id {c.token_ids[0]} is outside the vocabulary [0, {vocab})")
            if p >= self.max_len:
                raise ValueError(f"sequence {i} reaches position {p}, beyond max_model_len={self.max_len}")
            if p >= len(table) * bs:
                raise ValueError(f"sequence {i} needs {p + 1} slots but its block table holds {len(table)} "
                                 f"blocks of {bs}")
            used = table[:p // bs + 1]
            row = p if not long_from else rope_rows(p, p + 1, c.prompt_len, long_from)[0]  # its cos_sin row
            np64[0, i], np64[1, i], np64[2, i] = c.token_ids[0], row, table[p // bs] * bs + p % bs
            lens[i] = p + 1
            k, dirty = len(used), self.row_blocks[i]
            tables[i, :k] = used
            if dirty > k:
                tables[i, k:dirty] = 0
            self.row_blocks[i] = k
            widest = max(widest, k)
        if n and (tables[:n, :widest].min() < 0 or tables[:n, :widest].max() >= nb):  # every used block at once
            raise ValueError(f"a block table has a block outside [0, {nb})")
        b = self.bucket(n)
        self._pad(n, b)  # rows past b are neither copied nor read
        self.dev64.copy_(self.host64, non_blocking=True)  # whole (contiguous): 24 bytes a row
        w, m = self.width, self.max_batch
        self.dev32[:b].copy_(self.host32[:b], non_blocking=True)
        self.dev32[m:m + b * w].copy_(self.host32[m:m + b * w], non_blocking=True)
        if input_ids is not None:
            self.dev64[0, :n].copy_(input_ids, non_blocking=True)  # after the staging copy, in stream order
        if self.copied is not None:  # on the copies' stream: the model's device need not be the current one
            self.copied.record(torch.cuda.current_stream(self.runner.device))
        self.num_steps += 1
        if not self.capture:
            return self.runner.model.forward(self.meta(b), self.runner.kv_caches)[:n]
        self.graphs[b].replay()
        return self.logits[:n]

    def _capture(self) -> None:
        """Largest bucket first so that the smaller graphs reuse its memory pool. The padding rows
        write no KV, so capturing leaves the cache untouched."""
        with torch.cuda.device(self.runner.device):  # streams, capture and sync on the model's device
            self._capture_all()

    def _capture_all(self) -> None:
        model, caches = self.runner.model, self.runner.kv_caches
        self.dev64.copy_(self.host64)
        self.dev32.copy_(self.host32)
        # one capture stream for every bucket: the caching allocator reuses a pool's freed blocks only
        # on the stream that freed them (torch's shared default stream may live on another device)
        pool, capture_stream = None, torch.cuda.Stream()
        # Each graph copies its logits into this one buffer (rows :b), so the buckets share it
        # instead of each keeping its own [b, vocab] output alive (about 1 GB over the default
        # buckets with a 128k vocabulary); the forward's own output is a temporary of the pool.
        self.logits = torch.empty(self.max_batch, model.config.vocab_size, dtype=torch.float32, device=self.runner.device)
        for b in reversed(self.sizes):
            meta = self.meta(b)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up: lazy initialisation (cuBLAS handles) outside capture
                model.forward(meta, caches)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=capture_stream):
                self.logits[:b].copy_(model.forward(meta, caches))
            pool = graph.pool()
            self.graphs[b] = graph
        torch.cuda.synchronize()
