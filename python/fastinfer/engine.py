"""Engine: add_request / abort / step / has_unfinished over the scheduler, block manager and runner.

A request's checks are in request_checks.py, stop conditions in stopping.py, speculative steps in spec_decode.py,
pipelined decode steps in pipelined_decode.py."""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from .block_manager import BlockManager
from .loader import LoadedModel
from .metadata import SeqChunk
from .outputs import CompletionOutput, Logprob, RequestOutput
from .pipelined_decode import InFlight, can_pipeline, launch_decode, read_back
from .request_checks import (_Request, check_params, fill_max_tokens, new_request, tokenize_bad_words,
                             tokenize_prompt, validate_request)
from .runner import ModelRunner, default_graph_sizes
from .sampling import make_stream, mix_seed, sample
from .sampling_params import SamplingParams
from .scheduler import Scheduler, SchedulerConfig
from .sequence import Sequence, SeqStatus
from .spec_decode import SpecStats, lookahead, propose, verify_step
from .stopping import check_stop, history_bans, stop_ids


@dataclass(slots=True)
class EngineConfig:
    num_blocks: int
    block_size: int = 16
    max_model_len: int | None = None      # default: the model's
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    enable_prefix_caching: bool = True
    speculative: dict | None = None       # {"method": "ngram" | "draft", "num_tokens": k, ...}
    kv_cache_dtype: str = "auto"          # "auto" (the model's dtype) or "fp8" (e4m3, per-layer scales)
    decode_graphs: bool = False           # decode steps from static buffers: CUDA graphs on a GPU (runner.py)
    graph_sizes: list[int] | None = None  # their batch-size buckets; default runner.default_graph_sizes
    pipelined_decode: bool = False        # launch decode step n+1 before step n's tokens reach the host


class Engine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig):
        cfg = loaded.model.config
        self.loaded, self.config, self.tokenizer = loaded, config, loaded.tokenizer
        if config.max_model_len is not None and config.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1 (or None: the model's), got {config.max_model_len}")
        self.max_model_len = min(config.max_model_len or cfg.max_model_len, cfg.max_model_len)
        if config.max_model_len is not None and config.max_model_len > cfg.max_model_len:
            raise ValueError(f"max_model_len={config.max_model_len} exceeds the model's {cfg.max_model_len}")
        self.runner = ModelRunner(loaded.model, config.num_blocks, config.block_size, config.kv_cache_dtype)
        if config.decode_graphs:
            sizes = config.graph_sizes or default_graph_sizes(config.max_num_seqs)
            self.runner.enable_decode_graphs(sizes, self.max_model_len)
        self.proposer, self.spec_stats = None, SpecStats()
        prefix_caching = config.enable_prefix_caching
        if config.speculative is not None:
            from .proposers import make_proposer
            self.proposer = make_proposer(config.speculative, config.num_blocks, config.block_size,
                                          loaded.model.device, loaded.model.dtype)
            if getattr(self.proposer, "runner", None) is not None:
                draft_vocab = self.proposer.runner.model.config.vocab_size
                if draft_vocab != cfg.vocab_size:
                    raise ValueError(f"the draft model's vocabulary ({draft_vocab}) differs from the target's "
                                     f"({cfg.vocab_size}): it needs the same tokenizer")
                prefix_caching = False  # reused blocks would lack the draft's KV
        # Sliding-window models (every layer windowed) release the blocks below each sequence's window; not
        # with a draft model, whose attention reads the same blocks with its own window
        windows = [cfg.attention_window(i) for i in range(cfg.num_layers)]
        window = max(windows) if all(windows) and getattr(self.proposer, "runner", None) is None else 0
        self.blocks = BlockManager(config.num_blocks, config.block_size, prefix_caching, window, cfg.rope_long_from)
        self.scheduler = Scheduler(SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens), self.blocks)
        if cfg.rope_recompute_at_switch:
            self.scheduler.rope_restart_from = cfg.rope_long_from
        if self.proposer is not None:
            k = self.proposer.k
            self.scheduler.lookahead = lambda seq: lookahead(seq, k, self.max_model_len, self.scheduler.rope_restart_from)
        # config.json's EOS ids and generation_config's (Llama-3-Instruct ends turns with <|eot_id|> there),
        # as vLLM and HF's generate stop on both
        gen_eos = (loaded.generation_defaults or {}).get("eos_token_id")
        self.eos_ids = set(cfg.eos_token_id) | set([gen_eos] if isinstance(gen_eos, int) else (gen_eos or []))
        self.requests: dict[str, _Request] = {}
        self._arrivals = itertools.count()
        self.num_prompt_tokens = self.num_output_tokens = 0
        self._inflight: InFlight | None = None
        self.num_pipelined_steps = 0  # decode steps launched before the previous one was read back
        self._guides: dict = {}       # structured outputs: (pattern, stop ids) -> structured.TokenGuide
        self._vocabulary = None       # ... the tokenizer's token texts, built at the first such request

    # ---- requests ----------------------------------------------------------------------------------
    def tokenize(self, prompt: str | list[int]) -> list[int]:
        return tokenize_prompt(self.tokenizer, prompt)

    def validate(self, token_ids: list[int], params: SamplingParams) -> None:
        validate_request(token_ids, params, vocab_size=self.loaded.model.config.vocab_size,
                         max_model_len=self.max_model_len, block_size=self.config.block_size,
                         num_blocks=self.config.num_blocks, tokenizer=self.tokenizer, window=self.blocks.window,
                         step_tokens=min(self.config.max_num_batched_tokens, len(token_ids) + (params.max_tokens or 0))
                         + (self.proposer.k if self.proposer is not None else 0))

    def check_request(self, prompt: str | list[int], params: SamplingParams | None) -> tuple[list[int], SamplingParams]:
        """The prompt's token ids and the params the request will run with (max_tokens filled in), or
        a ValueError naming what is wrong; no state changes (LLM checks a whole batch with it first)."""
        params = check_params(params, speculative=self.proposer is not None)
        token_ids = self.tokenize(prompt)
        if params.truncate_prompt_tokens is not None:  # vLLM: the prompt's last k tokens
            token_ids = token_ids[-params.truncate_prompt_tokens:]
        params = tokenize_bad_words(fill_max_tokens(token_ids, params, self.max_model_len), self.tokenizer)
        self.validate(token_ids, params)
        if params.structured_outputs is not None:
            self._guide(params)  # compiled (and cached) now: a bad constraint fails before anything runs
        if (params.allowed_token_ids is not None and params.min_tokens > 0
                and set(params.allowed_token_ids) <= stop_ids(params, self.eos_ids)):
            raise ValueError("allowed_token_ids holds only stop tokens, which min_tokens suppresses: no token could "
                             "be generated")
        return token_ids, params

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    extra_seen_ids: tuple[int, ...] = (), ngram_history: list[int] | None = None) -> None:
        """Queue a request; a bad one raises ValueError here and never reaches the others."""
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        token_ids, params = self.check_request(prompt, params)
        req = new_request(request_id, prompt, token_ids, params, self.runner.device, self._arrivals, extra_seen_ids,
                          ngram_history)
        if params.structured_outputs is not None:
            req.seqs[0].guide = self._guide(params)
        self.requests[request_id] = req
        self.scheduler.add(req.seqs[0])

    def _guide(self, params: SamplingParams):
        """The structured-outputs token automaton of params (cached per pattern and stop tokens)."""
        from .structured import TokenGuide, Vocabulary
        stops = frozenset(stop_ids(params, self.eos_ids))
        key = (params.structured_outputs.pattern, stops)
        guide = self._guides.pop(key, None)  # re-inserted last: the least recently used are dropped first
        if guide is None:
            if self._vocabulary is None:
                self._vocabulary = Vocabulary(self.tokenizer, self.loaded.model.config.vocab_size)
            guide = TokenGuide(key[0], self._vocabulary, set(stops))
        self._guides[key] = guide
        while len(self._guides) > 32:  # running sequences keep theirs (seq.guide)
            self._guides.pop(next(iter(self._guides)))
        return guide

    def abort(self, request_id: str) -> None:
        req = self.requests.get(request_id)
        if req is None:
            return
        for seq in req.seqs:
            if not seq.is_finished:
                seq.finish_reason = "abort"
                self._finish_seq(seq)

    def has_unfinished(self) -> bool:
        if self._inflight is not None and not self.scheduler.has_unfinished():
            self._inflight = None  # a step launched ahead for sequences that have all finished since
        return self.scheduler.has_unfinished()

    def pop_finished(self, request_id: str) -> RequestOutput:
        """The finished (or aborted) request's output, removed from the engine."""
        req = self.requests.get(request_id)
        if req is None:
            raise ValueError(f"unknown request_id {request_id!r}")
        if not all(s.is_finished for s in req.seqs):
            raise ValueError(f"request {request_id!r} has not finished (abort it first)")
        return self._output(self.requests.pop(request_id))

    # ---- one step ----------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduled batch; returns the outputs of the requests it advanced.

        Pipelined decode (EngineConfig.pipelined_decode): while every running sequence decodes and
        nothing waits, step n + 1 is launched, fed with step n's sampled tokens on the device, before
        step n's tokens are read back and processed (stop checks, detokenization), so that host work
        overlaps the GPU. A sequence that stops at step n drops its token of step n + 1. Each call
        still returns the outputs of one step."""
        if self._inflight is not None:
            return self._step_pipelined()
        batch = self.scheduler.schedule()
        if not batch:
            if self.scheduler.has_unfinished():
                raise RuntimeError("scheduler could not place any sequence: KV pool too small")
            return []
        seqs = [s.seq for s in batch]
        if (len(batch) == len(self.scheduler.running) and all(s.num_tokens == 1 and s.seq.num_uncomputed_tokens == 1
                                                              for s in batch) and self._can_pipeline(seqs, 0)):
            self.num_prompt_tokens += sum(s.num_computed_tokens < len(s.prompt_token_ids) for s in seqs)  # 1-token prompts
            self._inflight = launch_decode(seqs, None, runner=self.runner, blocks=self.blocks)
            return self._step_pipelined()
        proposals, draft_probs = propose(self.proposer, batch, lambda seq: stop_ids(seq.params, self.eos_ids))
        chunks = []
        for i, s in enumerate(batch):
            seq, start = s.seq, s.seq.num_computed_tokens
            if i in proposals:
                chunks.append(SeqChunk(seq.token_slice(start, len(seq)) + proposals[i], start, list(seq.block_table),
                                       all_logits=True, prompt_len=seq.rope_prompt_len))
            else:
                n = min(s.num_tokens, seq.num_uncomputed_tokens)
                chunks.append(SeqChunk(seq.token_slice(start, start + n), start, seq.block_table,
                                       need_logits=start + n == len(seq),
                                       all_logits=seq.needs_prompt_logprobs and start < len(seq.prompt_token_ids) - 1,
                                       prompt_len=seq.rope_prompt_len))
        logits = self.runner.run(chunks)
        ready, ready_rows, spec, spec_rows, row = [], [], [], [], 0
        for i, (s, chunk) in enumerate(zip(batch, chunks)):
            rows = len(chunk.token_ids) if chunk.all_logits else int(chunk.need_logits)
            fed = 1 if i in proposals else len(chunk.token_ids)
            if s.seq.num_computed_tokens + fed <= len(s.seq.prompt_token_ids):
                self.num_prompt_tokens += fed
            s.seq.num_computed_tokens += fed
            if i in proposals:
                spec.append(i)
                spec_rows.append(logits[row:row + rows])
            else:
                if chunk.all_logits:  # a prompt chunk of a request with prompt_logprobs
                    self._prompt_logprobs(s.seq, chunk.start, logits[row:row + rows])
                if chunk.need_logits:
                    ready.append(s.seq)
                    ready_rows.append(row + rows - 1)
            row += rows
        if ready:
            seqs, row_logits = self._expand_forks(ready, logits[torch.tensor(ready_rows, device=logits.device)])
            self._sample_and_append(seqs, row_logits)
        if spec:
            spec_seqs = [batch[i].seq for i in spec]
            verify_step(torch.cat(spec_rows), spec_seqs, [proposals[i] for i in spec], draft_probs,
                        [stop_ids(s.params, self.eos_ids) for s in spec_seqs], blocks=self.blocks,
                        proposer=self.proposer, append_token=self._append_token, stats=self.spec_stats)
        for i, s in enumerate(batch):
            if not s.seq.is_finished:
                self.blocks.register_full_blocks(s.seq)
                if self.proposer is not None and i not in proposals:
                    self.blocks.trim(s.seq)  # lookahead blocks reserved for proposals that never came
        touched = {s.seq.request_id for s in batch}
        return [self._output(self.requests[r]) for r in touched if r in self.requests]

    # ---- pipelined decode (pipelined_decode.py) ----------------------------------------------------
    def _can_pipeline(self, seqs: list[Sequence], pending: int) -> bool:
        return (self.config.pipelined_decode and self.proposer is None
                and can_pipeline(seqs, pending, scheduler=self.scheduler, blocks=self.blocks,
                                 max_model_len=self.max_model_len)
                and not any(self.scheduler.rope_switch_due(s) for s in seqs))

    def _step_pipelined(self) -> list[RequestOutput]:
        """Launch the step after the one in flight (when it may be), then read that one back."""
        cur = self._inflight
        live = [s for s in cur.seqs if not s.is_finished]
        self._inflight = (launch_decode(live, cur, runner=self.runner, blocks=self.blocks)
                          if live and self._can_pipeline(live, 1) else None)
        if self._inflight is not None:
            self.num_pipelined_steps += 1
        touched = read_back(cur, append_token=self._append_token, blocks=self.blocks)
        return [self._output(self.requests[r]) for r in touched if r in self.requests]

    def _expand_forks(self, ready: list[Sequence], logits: torch.Tensor) -> tuple[list[Sequence], torch.Tensor]:
        """A request with n > 1 splits into n sequences once its prompt is computed; they share the
        prompt's full blocks and each samples its own first token from the same logits."""
        rows, index = [], []
        for i, seq in enumerate(ready):
            rows.append(seq)
            index.append(i)
            if seq.params.n > 1 and not seq.forked:
                seq.forked = True
                req = self.requests[seq.request_id]
                for k in range(1, seq.params.n):
                    child = Sequence(seq.request_id, k, seq.prompt_token_ids, seq.params,
                                     make_stream(_child_seed(seq.params.seed, k), self.runner.device),
                                     seq.arrival, seq.extra_seen_ids)
                    child.ngram_history = seq.ngram_history
                    child.guide = seq.guide
                    child.forked = True
                    child.prompt_logprobs = None  # the request's are seq's (computed before the fork)
                    if (len(self.scheduler.running) < self.config.max_num_seqs
                            and self.blocks.can_fork(seq)):
                        partial = self.blocks.fork(seq, child)
                        if partial is not None:
                            self.runner.copy_block(partial, child.block_table[-1])
                        child.status = SeqStatus.RUNNING
                        self.scheduler.running.append(child)
                    else:  # no room (a free block, a batch slot): it samples its first token now and
                        # waits with no KV, to be computed again when admitted, as a preempted one
                        child.status = SeqStatus.WAITING
                        self.scheduler.waiting.appendleft(child)
                    req.seqs.append(child)
                    rows.append(child)
                    index.append(i)
        return rows, logits[torch.tensor(index, device=logits.device)] if rows else logits

    def _sample_and_append(self, rows: list[Sequence], logits: torch.Tensor) -> None:
        if any(s.guide is not None for s in rows):  # structured outputs: a row no token continues ends here
            keep = [i for i, s in enumerate(rows) if s.guide is None or self._guide_continues(s)]
            if len(keep) < len(rows):
                rows, logits = [rows[i] for i in keep], logits[torch.tensor(keep, dtype=torch.long, device=logits.device)]
                if not rows:
                    return
        suppress = [(sorted(stop_ids(s.params, self.eos_ids)) if len(s.output_token_ids) < s.params.min_tokens else [])
                    + history_bans(s) for s in rows]
        # the prompt + output lists only when a repetition penalty reads them (O(length) per row)
        penalised = any(s.params.repetition_penalty != 1.0 for s in rows)
        seen = [list(s.extra_seen_ids) + s.all_token_ids if penalised else [] for s in rows]
        guided = [i for i, s in enumerate(rows) if s.guide is not None]
        if guided:  # structured outputs: only the tokens the automaton allows from each row's state
            masks = torch.stack([rows[i].guide.mask(rows[i].guide_state, self.runner.device) for i in guided])
            index = torch.tensor(guided, device=logits.device)
            logits = logits.index_put((index,), logits[index].masked_fill(~masks, float("-inf")))
        tokens = sample(logits, [s.params for s in rows], seen, [s.output_token_ids for s in rows], suppress,
                        [s.generator for s in rows]).tolist()
        want_logprobs = [i for i, s in enumerate(rows) if s.logprobs is not None]
        logprobs = torch.log_softmax(logits[want_logprobs], dim=-1) if want_logprobs else None
        for j, i in enumerate(want_logprobs):  # vLLM's shape: {token id: Logprob}, sampled token first
            seq, k = rows[i], rows[i].params.logprobs
            sampled = float(logprobs[j, tokens[i]])
            ids, values = [tokens[i]], [sampled]
            ranks = [int((logprobs[j] >= sampled).sum())]  # vLLM counts ties as ahead
            if k:
                top = torch.topk(logprobs[j], k)
                ids += top.indices.tolist()
                values += top.values.tolist()
                ranks += range(1, k + 1)
            decode = self.tokenizer is not None and seq.params.detokenize
            seq.logprobs.append({t: Logprob(v, r, self.tokenizer.decode([t]) if decode else None)
                                 for t, v, r in zip(ids, values, ranks)})
            seq.cumulative_logprob += sampled
        for seq, tok in zip(rows, tokens):
            self._append_token(seq, tok)

    def _guide_continues(self, seq: Sequence) -> bool:
        """Advance seq's automaton state over the tokens appended since; False, with seq finished, when no
        token continues its structure: "stop" if its output is complete, else "abort" (structured.TokenGuide)."""
        if seq.guide_state is None:
            seq.guide_state = seq.guide.initial
        while seq.guide_pos < len(seq.output_token_ids):
            seq.guide_state = seq.guide.next_state(seq.guide_state, seq.output_token_ids[seq.guide_pos])
            seq.guide_pos += 1
        if seq.guide.can_continue(seq.guide_state):
            return True
        complete = seq.guide.accepts(seq.guide_state)
        seq.finish_reason = "stop" if complete else "abort"
        seq.stop_reason = None if complete else "structured_outputs: no token of the vocabulary continues the structure"
        self._finish_seq(seq)
        return False

    def _prompt_logprobs(self, seq: Sequence, start: int, rows: torch.Tensor) -> None:
        """Row j of a prompt chunk starting at `start` predicts prompt position start + j + 1: that token's
        logprob and rank and the top prompt_logprobs ones, as vLLM's prompt_logprobs entries."""
        prompt, k = seq.prompt_token_ids, seq.params.prompt_logprobs
        positions = [p for p in range(start + 1, start + rows.shape[0] + 1) if p < len(prompt)]
        if not positions:
            return
        targets = torch.tensor([prompt[p] for p in positions], device=rows.device)
        chosen, ranks, top_ids, top_values = [], [], [], []
        for lo in range(0, len(positions), 256):  # slices: the fp32 temporaries stay ~128 MB at 128k tokens
            logprobs = torch.log_softmax(rows[lo:min(lo + 256, len(positions))].float(), dim=-1)
            picked = logprobs.gather(1, targets[lo:lo + logprobs.shape[0], None])
            ranks += (logprobs >= picked).sum(dim=1).tolist()  # vLLM counts ties as ahead
            chosen += picked[:, 0].tolist()
            if k:
                top = torch.topk(logprobs, k)
                top_ids += top.indices.tolist()
                top_values += top.values.tolist()
        if not k:
            top_ids = top_values = [[]] * len(positions)
        decode = self.tokenizer is not None and seq.params.detokenize
        for j, p in enumerate(positions):  # the prompt token first, as the sampled one in `logprobs`
            ids, values = [prompt[p]] + top_ids[j], [chosen[j]] + top_values[j]
            seq.prompt_logprobs[p] = {t: Logprob(v, r, self.tokenizer.decode([t]) if decode else None)
                                      for t, v, r in zip(ids, values, [ranks[j], *range(1, k + 1)])}

    def _append_token(self, seq: Sequence, tok: int) -> None:
        seq.output_token_ids.append(tok)
        self.num_output_tokens += 1
        stop = check_stop(seq, tok, eos_ids=self.eos_ids, tokenizer=self.tokenizer, max_model_len=self.max_model_len)
        if stop is not None:
            seq.finish_reason, seq.stop_reason = stop
            self._finish_seq(seq)

    def _finish_seq(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)
        if self.proposer is not None:
            self.proposer.release(seq)  # any per-sequence state the proposer keeps

    def _output(self, req: _Request) -> RequestOutput:
        outs = [CompletionOutput(s.index, s.text, list(s.output_token_ids), s.finish_reason, s.stop_reason,
                                 s.logprobs, s.cumulative_logprob) for s in sorted(req.seqs, key=lambda s: s.index)]
        done = all(s.is_finished for s in req.seqs) and (req.params.n == 1 or req.seqs[0].forked
                                                         or req.seqs[0].finish_reason == "abort")
        first = req.seqs[0]
        prompt_logprobs = None
        if first.prompt_logprobs is not None and not first.needs_prompt_logprobs:
            prompt_logprobs = [None] + [first.prompt_logprobs[p] for p in range(1, len(req.prompt_token_ids))]
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs, done,
                             first.num_prefix_hit_tokens, prompt_logprobs)


def _child_seed(seed: int | None, index: int) -> int | None:
    """The seed of completion `index` (> 0) of an n > 1 request: its own TokenStream."""
    return None if seed is None else mix_seed(seed, -1 - index)  # negative keys: never an output position
