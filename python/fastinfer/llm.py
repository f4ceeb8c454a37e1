"""``LLM``: the offline batch API (vLLM-style) over the continuous-batching engine."""
from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence as Seq

import torch

from .engine import Engine, EngineConfig
from .generate import get_loaded
from .models.llama import kv_cache_storage_dtype
from .outputs import RequestOutput
from .request_checks import check_vllm_engine_args, refuse_vllm_request_args
from .sampling_params import SamplingParams

DEFAULT_CPU_KV_BYTES = 1 << 30


@dataclass
class StreamDelta:
    index: int            # the prompt's position in the call
    completion: int       # which of its n completions
    text: str             # text added since the previous delta
    token_ids: list[int]  # tokens added since the previous delta
    finish_reason: str | None


class LLM:
    def __init__(self, model, dtype=None, device=None, max_model_len: int | None = None,
                 num_blocks: int | None = None, gpu_memory_utilization: float = 0.9,
                 kv_cache_memory_bytes: int | None = None, block_size: int = 16, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 8192, enable_prefix_caching: bool = True,
                 speculative: dict | None = None, quantization: str | None = None, kv_cache_dtype: str = "auto",
                 enforce_eager: bool = False, cuda_graph_sizes: list[int] | None = None, tokenizer=None,
                 tensor_parallel_size: int = 1, trust_remote_code: bool = False, speculative_config: dict | None = None,
                 seed: int | None = None, enable_chunked_prefill: bool | None = None, swap_space: float | None = None,
                 disable_log_stats: bool = True, tokenizer_mode: str = "auto"):
        """quantization: None (the checkpoint's own format), "int4" (round-to-nearest at load),
        "gptq", "awq" or "gguf" (4-bit projections on the fused W4A16 kernel), or "fp8" (e4m3
        linear weights with per-channel scales, activations quantized per token; a bf16/fp32
        checkpoint is quantized on load, an FP8 checkpoint is detected from its config.json); see
        fastinfer.load_model. kv_cache_dtype "fp8": an e4m3 KV cache (half the bytes of bf16) with
        per-layer scales. speculative: see README. On a GPU, decode steps of up to
        max(cuda_graph_sizes) sequences (default: buckets up to max_num_seqs) replay CUDA graphs
        captured here; enforce_eager=True runs every step eagerly. On a GPU, decode steps are
        also pipelined (the next launched before the host reads the last one's tokens, see
        Engine.step). tokenizer: a local tokenizer directory or a tokenizer object (HF's or any with
        __call__ -> {"input_ids"} and decode) instead of the model's (an HF model object has none).
        tensor_parallel_size: 1 only (one GPU); trust_remote_code: accepted for vLLM's signature, no
        effect (fastinfer runs its own model code and never imports a checkpoint's). speculative_config:
        vLLM's name for `speculative` (either, not both). seed, enable_chunked_prefill, swap_space,
        disable_log_stats, tokenizer_mode: vLLM's, see request_checks.check_vllm_engine_args."""
        check_vllm_engine_args(seed, enable_chunked_prefill, swap_space, disable_log_stats, tokenizer_mode)
        if speculative_config is not None:
            if speculative is not None:
                raise ValueError("give speculative or speculative_config (vLLM's name for it), not both")
            speculative = speculative_config
        if tensor_parallel_size != 1:
            raise ValueError(f"tensor_parallel_size={tensor_parallel_size!r}: fastinfer runs a model on one GPU (only 1)")
        if not isinstance(trust_remote_code, bool):
            raise ValueError(f"trust_remote_code must be a bool, got {trust_remote_code!r}")
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        if num_blocks is not None and num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if cuda_graph_sizes is not None and (not cuda_graph_sizes or any(
                not isinstance(b, int) or b < 1 for b in cuda_graph_sizes)):
            raise ValueError(f"cuda_graph_sizes must be a non-empty list of positive ints, got {cuda_graph_sizes!r}")
        self.kv_cache_dtype = kv_cache_dtype
        self.loaded = get_loaded(model, dtype, device, quantization)
        if tokenizer is not None:  # a copy: the cached LoadedModel keeps its own
            self.loaded = dataclasses.replace(self.loaded, tokenizer=_load_tokenizer(tokenizer))
        m = self.loaded.model
        kv_cache_storage_dtype(kv_cache_dtype, m.dtype, m.device, m.config.head_dim)  # unknown / unsupported: fails here
        if num_blocks is None:
            num_blocks = self._size_kv_pool(block_size, gpu_memory_utilization, kv_cache_memory_bytes,
                                            max_num_batched_tokens, max_model_len)
        self.engine = Engine(self.loaded, EngineConfig(num_blocks, block_size, max_model_len, max_num_seqs,
                                                       max_num_batched_tokens, enable_prefix_caching, speculative,
                                                       kv_cache_dtype, decode_graphs=self._use_graphs(enforce_eager),
                                                       graph_sizes=cuda_graph_sizes,
                                                       pipelined_decode=m.device.type == "cuda"))
        self._ids = itertools.count()
        if seed is not None:  # vLLM's global seed, set last (nothing above draws after it): the CPU and every GPU
            torch.manual_seed(seed)

    def _use_graphs(self, enforce_eager: bool) -> bool:
        return not enforce_eager and self.loaded.model.device.type == "cuda"

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    def get_tokenizer(self):
        """vLLM's accessor: the tokenizer requests are encoded and decoded with (None without one)."""
        return self.loaded.tokenizer

    def _block_bytes(self, block_size: int) -> int:
        m = self.loaded.model
        cfg = m.config
        itemsize = kv_cache_storage_dtype(self.kv_cache_dtype, m.dtype, m.device, cfg.head_dim).itemsize
        return cfg.num_layers * 2 * block_size * cfg.num_kv_heads * cfg.head_dim * itemsize

    def _size_kv_pool(self, block_size, utilization, budget, max_tokens, max_model_len) -> int:
        """CPU: a byte budget. GPU: what is left of utilization * total memory after a warm-up
        forward at the largest batch, so an out-of-memory shows here, never mid-request."""
        model = self.loaded.model
        if model.device.type == "cpu":
            return max(1, (budget or DEFAULT_CPU_KV_BYTES) // self._block_bytes(block_size))
        from .metadata import SeqChunk
        from .runner import ModelRunner
        seq_len = min(max_tokens, max_model_len or model.config.max_model_len)
        num_seqs = -(-max_tokens // seq_len)
        blocks_per_seq = -(-seq_len // block_size)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(model.device)
        probe = ModelRunner(model, num_seqs * blocks_per_seq, block_size, self.kv_cache_dtype)
        chunks = [SeqChunk([0] * seq_len, 0, list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)))
                  for i in range(num_seqs)]
        probe.run(chunks)
        torch.cuda.synchronize(model.device)
        peak = torch.cuda.max_memory_allocated(model.device) - probe.num_blocks * self._block_bytes(block_size)
        del probe
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(model.device).total_memory
        free_for_kv = int(total * utilization) - peak
        blocks = free_for_kv // self._block_bytes(block_size)
        if blocks < 1:
            raise ValueError(f"no GPU memory left for the KV cache at gpu_memory_utilization={utilization}")
        return int(blocks)

    # ---- generation --------------------------------------------------------------------------------
    def get_default_sampling_params(self) -> SamplingParams:
        """What generate() uses when given no SamplingParams, as vLLM's (generation_config="auto"): the
        model's generation config's non-default repetition_penalty, temperature, top_k, top_p, min_p and
        max_new_tokens (as max_tokens) over SamplingParams()' defaults."""
        from .gen_config import HF_DEFAULTS
        gen, diff = self.loaded.generation_defaults or {}, {}
        for key in ("repetition_penalty", "temperature", "top_k", "top_p", "min_p", "max_new_tokens"):
            value = gen.get(key)
            if value is not None and value != HF_DEFAULTS.get(key):
                diff["max_tokens" if key == "max_new_tokens" else key] = value
        return SamplingParams(**diff)

    def _requests(self, prompts, sampling_params) -> tuple[list, list[SamplingParams]]:
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise ValueError(f"prompts must be a str, a list of token ids or a list of prompts, "
                             f"got {type(prompts).__name__}")
        prompts = list(prompts)
        if not prompts:
            raise ValueError("prompts is empty")
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, dict):
                try:
                    prompts[i] = _from_prompt_dict(prompt)
                except ValueError as e:
                    raise ValueError(f"prompts[{i}]: {e}") from None
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or self.get_default_sampling_params()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"sampling_params has {len(params)} entries for {len(prompts)} prompts")
        for i, (prompt, p) in enumerate(zip(prompts, params)):  # every request checked before any runs
            try:
                if not isinstance(p, SamplingParams):
                    raise ValueError(f"expected SamplingParams, got {type(p).__name__}")
                self.engine.check_request(prompt, p)  # the checks add_request makes, nothing queued
            except ValueError as e:
                raise ValueError(f"prompts[{i}]: {e}") from None
        return prompts, params

    def _submit(self, prompts, params) -> list[str]:
        ids = []
        try:
            for prompt, p in zip(prompts, params):
                rid = str(next(self._ids))
                self.engine.add_request(rid, prompt, p)
                ids.append(rid)
        except BaseException:
            self._release(ids)  # none of this call's requests stays queued
            raise
        return ids

    def _release(self, ids) -> None:
        """Abort and drop requests of this LLM's call that are still in the engine (an exception, a
        stream closed early): nothing is left to run in, or leak from, a later call."""
        for rid in ids:
            if rid in self.engine.requests:
                self.engine.abort(rid)
                self.engine.pop_finished(rid)

    def generate(self, prompts, sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm=True, lora_request=None, priority=None) -> list[RequestOutput]:
        """One RequestOutput per prompt, in input order. prompts: a str, a list of token ids, a
        vLLM prompt dict ({"prompt": str} or {"prompt_token_ids": [...]}) or a list of these.
        use_tqdm: a bool or, as in vLLM, a tqdm-like class to build the progress bar with. lora_request and
        priority (vLLM's) must be None: per-request adapters and priority scheduling are not implemented."""
        refuse_vllm_request_args(lora_request, priority)
        prompts, params = self._requests(prompts, sampling_params)
        ids = self._submit(prompts, params)
        pending = set(ids)
        bar = _progress(len(ids), use_tqdm if callable(use_tqdm) else None) if use_tqdm else None
        start, tokens0 = time.perf_counter(), (self.engine.num_prompt_tokens, self.engine.num_output_tokens)
        results: dict[str, RequestOutput] = {}
        try:
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    if out.finished and out.request_id in pending:
                        pending.discard(out.request_id)
                        results[out.request_id] = self.engine.pop_finished(out.request_id)
                        if bar is not None:
                            elapsed = max(time.perf_counter() - start, 1e-9)
                            postfix = (f"in: {(self.engine.num_prompt_tokens - tokens0[0]) / elapsed:.0f} tok/s, "
                                       f"out: {(self.engine.num_output_tokens - tokens0[1]) / elapsed:.0f} tok/s")
                            if self.engine.proposer is not None:
                                postfix += f", accept len: {self.engine.spec_stats.mean_acceptance_length:.2f}"
                            bar.set_postfix_str(postfix)
                            bar.update(1)
        finally:
            self._release(pending)
            if bar is not None:
                bar.close()
        return [results[r] for r in ids]

    def beam_search(self, prompts, params, use_tqdm: bool = False):
        """vLLM's LLM.beam_search: one BeamSearchOutput per prompt, its best params.beam_width sequences
        (prompt + generated tokens, cumulative logprob, text), best first (vllm_beam_search.py)."""
        from .vllm_beam_search import beam_search
        return beam_search(self, prompts, params, use_tqdm)

    def chat(self, messages, sampling_params: SamplingParams | Seq[SamplingParams] | None = None, use_tqdm=True,
             chat_template: str | None = None, add_generation_prompt: bool = True,
             continue_final_message: bool = False, chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """vLLM's LLM.chat: one conversation (a list of {"role": ..., "content": str} messages) or a list of
        them, each rendered with the tokenizer's chat template (or chat_template, a Jinja string),
        tokenized without adding special tokens (the template writes them) and generated as generate()
        does. add_generation_prompt: end with the assistant turn's header; continue_final_message: leave
        the last message open for the model to continue (not with add_generation_prompt).
        chat_template_kwargs: extra variables for the template. Each RequestOutput's prompt is the
        rendered text. Every conversation is checked before any runs."""
        tok = self.tokenizer
        if tok is None:
            raise ValueError("chat needs a tokenizer: this model was loaded without one (pass LLM(..., tokenizer=...) "
                             "or use generate with token ids)")
        if not callable(getattr(tok, "apply_chat_template", None)):
            raise ValueError(f"chat needs a tokenizer with apply_chat_template; {type(tok).__name__} has none")
        if add_generation_prompt and continue_final_message:
            raise ValueError("add_generation_prompt and continue_final_message cannot both be set: the first "
                             "starts a new assistant turn, the second continues the last message")
        if chat_template_kwargs is not None and not isinstance(chat_template_kwargs, dict):
            raise ValueError(f"chat_template_kwargs must be a dict, got {type(chat_template_kwargs).__name__}")
        conversations = _conversations(messages)
        # vLLM's merge: chat_template_kwargs may override the named arguments
        kwargs = dict(chat_template=chat_template, add_generation_prompt=add_generation_prompt,
                      continue_final_message=continue_final_message)
        kwargs.update(chat_template_kwargs or {})
        kwargs["tokenize"] = False
        texts, ids = [], []
        for i, conversation in enumerate(conversations):
            try:
                text = tok.apply_chat_template(conversation, **kwargs)
            except Exception as e:  # no template, a Jinja error, a template's own raise_exception
                raise ValueError(f"conversation {i}: the chat template could not render it: {type(e).__name__}: "
                                 f"{e}") from None
            texts.append(text)
            ids.append(list(tok(text, add_special_tokens=False)["input_ids"]))
        outs = self.generate([{"prompt_token_ids": t} for t in ids], sampling_params, use_tqdm=use_tqdm)
        for out, text in zip(outs, texts):
            out.prompt = text
        return outs

    def stream(self, prompts, sampling_params=None) -> Iterator[StreamDelta]:
        """Yield incremental text per request and completion as the engine produces it."""
        prompts, params = self._requests(prompts, sampling_params)
        ids = self._submit(prompts, params)
        position = {r: i for i, r in enumerate(ids)}
        # text that may be the start of a stop string is held back until the sequence finishes (the
        # engine cuts a matched stop string from the final text)
        hold = {r: max(map(len, p.stop or [""])) - 1 if p.stop else 0 for r, p in zip(ids, params)}
        sent: dict[tuple[str, int], tuple[int, int, bool]] = {}
        pending = set(ids)
        try:
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    if out.request_id not in pending:
                        continue
                    for c in out.outputs:
                        n_text, n_tok, done = sent.get((out.request_id, c.index), (0, 0, False))
                        if done:
                            continue
                        text = c.text
                        if not c.finished():
                            text = text.rstrip("\ufffd")  # hold back partial UTF-8
                            text = text[:max(n_text, len(text) - hold[out.request_id])]
                        if len(text) > n_text or len(c.token_ids) > n_tok or c.finished():
                            sent[(out.request_id, c.index)] = (len(text), len(c.token_ids), c.finished())
                            yield StreamDelta(position[out.request_id], c.index, text[n_text:],
                                              c.token_ids[n_tok:], c.finish_reason)
                    if out.finished:
                        pending.discard(out.request_id)
                        self.engine.pop_finished(out.request_id)
        finally:  # a stream closed early (a client gone) or an error: its requests stop and are dropped
            self._release(pending)

    @property
    def speculative_stats(self):
        """SpecStats: acceptance_rate and mean_acceptance_length (tokens per verifying step)."""
        return self.engine.spec_stats

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.engine.blocks.prefix_hit_rate


def _progress(total: int, factory=None):
    if factory is None:
        from tqdm.auto import tqdm as factory
    return factory(total=total, desc="Processed prompts", dynamic_ncols=True)


def _load_tokenizer(tokenizer):
    """LLM's tokenizer argument: a tokenizer object, or a local directory for transformers.AutoTokenizer
    (no download: this package never reaches a model hub)."""
    if isinstance(tokenizer, (str, Path)):
        path = Path(tokenizer)
        if not path.is_dir():
            raise ValueError(f"tokenizer={str(tokenizer)!r} is not a directory (a local tokenizer; no hub downloads)")
        try:
            from transformers import AutoTokenizer
            return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as e:
            raise ValueError(f"tokenizer={str(tokenizer)!r} could not be loaded: {type(e).__name__}: {e}") from None
    if not (callable(tokenizer) and callable(getattr(tokenizer, "decode", None))):
        raise ValueError(f"tokenizer must be a directory or a tokenizer (callable, with decode), got "
                         f"{type(tokenizer).__name__}")
    return tokenizer


def _conversations(messages) -> list[list[dict]]:
    """LLM.chat's messages: one conversation (a list of message dicts) or a list of conversations,
    each message a dict with a str "role" and a "content" that is a str, a list of OpenAI-style text
    parts ({"type": "text", "text": str}, joined with newlines as vLLM does for text-only templates) or,
    for a message carrying tool_calls, None; other keys go to the template as they are."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"messages must be a non-empty list of message dicts, or of such lists, got {messages!r:.80}")
    conversations = [messages] if isinstance(messages[0], dict) else list(messages)
    for i, conversation in enumerate(conversations):
        if not isinstance(conversation, (list, tuple)) or not conversation:
            raise ValueError(f"messages[{i}] must be a non-empty list of message dicts, got {conversation!r:.80}")
        for j, message in enumerate(conversation):
            where = f"messages[{i}][{j}]" if len(conversations) > 1 or not isinstance(messages[0], dict) \
                else f"messages[{j}]"
            if not isinstance(message, dict):
                raise ValueError(f"{where} must be a dict with 'role' and 'content', got {type(message).__name__}")
            if not isinstance(message.get("role"), str):
                raise ValueError(f"{where}['role'] must be a str, got {message.get('role')!r:.80}")
            content = message.get("content")
            if isinstance(content, list):
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           for p in content):
                    raise ValueError(f"{where}['content'] parts must be {{'type': 'text', 'text': str}} (fastinfer "
                                     f"runs text models), got {content!r:.80}")
            elif not (isinstance(content, str) or (content is None and message.get("tool_calls"))):
                raise ValueError(f"{where}['content'] must be a str or a list of text parts, got {content!r:.80}")
    return [[{**m, "content": "\n".join(p["text"] for p in m["content"])} if isinstance(m.get("content"), list) else m
             for m in c] for c in conversations]


def _from_prompt_dict(prompt: dict):
    """vLLM's TextPrompt {"prompt": str} / TokensPrompt {"prompt_token_ids": [...]} -> the str or the
    list of ids; a key fastinfer does not act on (multi_modal_data, ...) is an error naming it."""
    key = "prompt_token_ids" if "prompt_token_ids" in prompt else "prompt"
    extra = sorted(str(k) for k, v in prompt.items() if k != key and v is not None
                   and not (key == "prompt_token_ids" and k == "prompt"))
    if extra:
        raise ValueError(f"prompt dict key(s) {extra} not supported (only 'prompt' or 'prompt_token_ids')")
    if key not in prompt:
        raise ValueError("a prompt dict needs a 'prompt' or a 'prompt_token_ids' key")
    value = prompt[key]
    if key == "prompt" and not isinstance(value, str):
        raise ValueError(f"prompt dict's 'prompt' must be a str, got {type(value).__name__}")
    if key == "prompt_token_ids" and not isinstance(value, (list, tuple)):
        raise ValueError(f"prompt dict's 'prompt_token_ids' must be a list of ints, got {type(value).__name__}")
    return value if isinstance(value, str) else list(value)
