"""``fastinfer.generate``: a drop-in for HF ``model.generate`` on decoder-only models.

Takes what HF takes (input_ids with left padding and attention_mask, generation_config, the usual
keywords) and returns what it returns: a LongTensor [batch * num_return_sequences, width + new]
holding the prompts as given, then the new tokens, finished rows padded with pad_token_id.
"""
from __future__ import annotations

import weakref
from pathlib import Path

import torch

from . import gen_config
from .loader import LoadedModel, load_model

_hf_cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_path_cache: dict[tuple, LoadedModel] = {}


def _fingerprint(hf_model) -> tuple:
    """Changes when any parameter is replaced or modified in place (or a PEFT model's adapters are switched,
    disabled or merged), so a cached copy is never stale."""
    from .loader.peft import adapter_state, is_peft_model
    params = tuple((p.data_ptr(), p._version) for p in hf_model.parameters())
    return (params, adapter_state(hf_model)) if is_peft_model(hf_model) else params


def get_loaded(model, dtype=None, device=None, quantization: str | None = None, cache: bool = True) -> LoadedModel:
    """A LoadedModel for a path, an HF model object or a LoadedModel; cache=False never evicts."""
    if isinstance(model, LoadedModel):
        if quantization is not None and model.model.quantization != quantization:
            raise ValueError(f"quantization={quantization!r} was asked for a model already loaded with "
                             f"{model.model.quantization!r}")
        return model
    if isinstance(model, (str, Path)):
        key = (str(Path(model).resolve()), str(dtype), str(device), quantization)
        if not cache:
            return _path_cache.get(key) or load_model(model, dtype, device, quantization)
        if key not in _path_cache:
            _path_cache.clear()  # keep one model resident
            _path_cache[key] = load_model(model, dtype, device, quantization)
        return _path_cache[key]
    entry = _hf_cache.get(model)
    fp = (_fingerprint(model), quantization, str(dtype), str(device))
    if entry is None or entry[0] != fp:
        entry = (fp, load_model(model, dtype, device, quantization))
        _hf_cache[model] = entry
    return entry[1]


def _prompts(input_ids, attention_mask, pad_token_id, eos_ids, vocab_size) -> tuple[list[list[int]], list[tuple[int, ...]]]:
    """The prompts (the tokens the mask keeps), and per row the masked-out tokens after its first kept
    one, which HF's repetition penalty still counts (it skips only the left padding)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError("input_ids must be an integer torch.Tensor [batch, length]")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a non-empty [batch, length] tensor, got shape {tuple(input_ids.shape)}")
    if attention_mask is None:  # HF: infer from the pad token when it is not also the EOS token
        if pad_token_id is not None and (input_ids == pad_token_id).any() and pad_token_id not in eos_ids:
            attention_mask = input_ids != pad_token_id
        else:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} does not match input_ids {tuple(input_ids.shape)}")
    prompts, holes = [], []
    for row, (ids, mask) in enumerate(zip(input_ids.tolist(), attention_mask.bool().tolist())):
        prompt = [t for t, m in zip(ids, mask) if m]
        if not prompt:
            raise ValueError(f"prompt {row} is empty (attention_mask has no ones)")
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt {row} has token id {bad[0]} outside the vocabulary [0, {vocab_size})")
        if not mask[-1]:  # HF runs the last column (a pad) as the query of the first new token
            raise ValueError(f"prompt {row} is right-padded (its attention_mask ends with 0): decoder-only "
                             f"generation needs left padding (tokenizer.padding_side='left'); HF generates from "
                             f"the pad token there (it warns), which fastinfer does not reproduce")
        prompts.append(prompt)
        first = mask.index(True)
        holes.append(tuple(t for t, m in zip(ids[first:], mask[first:]) if not m and 0 <= t < vocab_size))
    return prompts, holes


def generate(model, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
             generation_config=None, streamer=None, **kwargs) -> torch.LongTensor:
    """Greedy or sampled generation with HF semantics; ``model`` is an HF model, a path or a LoadedModel.
    The prompts may also come as ``inputs=`` (HF's name for its first argument)."""
    if "inputs" in kwargs:
        if input_ids is not None:
            raise ValueError("generate(): pass the prompts once, as input_ids or as inputs, not both")
        input_ids = kwargs.pop("inputs")
    if not isinstance(input_ids, torch.Tensor):
        raise ValueError(f"input_ids must be an integer torch.Tensor [batch, length], got {type(input_ids).__name__}")
    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        raise ValueError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__} (HF's second "
                         f"positional argument is generation_config: pass it as generation_config=...)")
    tokenizer = kwargs.pop("tokenizer", None)  # HF's: what stop_strings are matched with
    assistant = kwargs.pop("assistant_model", None)  # HF's assisted generation: a draft model
    loaded = get_loaded(model, kwargs.pop("dtype", None), kwargs.pop("device", None), kwargs.pop("quantization", None))
    cfg = loaded.model.config
    input_ids = input_ids if input_ids.dim() == 2 else input_ids[None]
    # An HF model's generation_config as it is now (HF reads it at every call), else the loaded one's
    hf_gen = None if isinstance(model, (LoadedModel, str, Path)) else getattr(model, "generation_config", None)
    defaults = hf_gen.to_dict() if hf_gen is not None else loaded.generation_defaults
    # HF takes eos / pad from the generation config alone; the model config's count only where there is
    # none (a checkpoint without generation_config.json, whose generation config HF builds from config.json)
    from_config = hf_gen is None and not defaults
    settings = gen_config.resolve(defaults, generation_config, kwargs, input_ids.shape[1],
                                  cfg.eos_token_id if from_config else [], cfg.pad_token_id if from_config else None,
                                  cfg.max_position_embeddings)
    prompts, holes = _prompts(input_ids, attention_mask, settings.pad_token_id, settings.eos_token_ids,
                              cfg.vocab_size)
    speculative = _speculative(assistant, settings)
    stops = None
    if settings.stop_strings:
        if tokenizer is None:  # as HF: the strings are matched on the tokenizer's token texts
            raise ValueError("generate(): stop_strings need the tokenizer: pass tokenizer=... as with HF's generate")
        from .hf_stop_strings import StopStrings
        stops = StopStrings(tokenizer, settings.stop_strings)
    n = settings.num_return_sequences if settings.num_beams == 1 else 1
    rows = [p for p in prompts for _ in range(n)]
    hole_rows = [h for h in holes for _ in range(n)]
    longest = max(map(len, rows)) + settings.max_new_tokens
    if longest > cfg.max_model_len:
        raise ValueError(f"prompt + max_new_tokens = {longest} tokens exceeds the model's maximum length "
                         f"{cfg.max_model_len}")
    if speculative is not None and (settings.num_beams > 1 or settings.output_scores or settings.output_logits
                                    or settings.hf_hooks):
        raise ValueError("generate(): assisted generation (assistant_model / prompt_lookup_num_tokens) runs greedy "
                         "or sampled decoding without per-step scores here; not with num_beams > 1, "
                         "output_scores / output_logits, logits_processor, stopping_criteria, "
                         "prefix_allowed_tokens_fn, max_time, the typical_p / epsilon_cutoff / eta_cutoff warpers, "
                         "sequence_bias, forced_bos_token_id / forced_eos_token_id, exponential_decay_length_penalty, "
                         "begin_suppress_tokens or remove_invalid_values")
    if settings.num_beams > 1:  # HF's beam search (beam_search.py)
        if streamer is not None:
            raise ValueError("streamer cannot be used with beam search (num_beams > 1), as in HF")
        from .beam_search import beam_search
        return beam_search(loaded, input_ids, prompts, holes, settings, stop_strings=stops)
    if (settings.return_dict and (settings.output_scores or settings.output_logits)) or settings.hf_hooks:
        # HF's per-step scores, or the caller's processors / criteria on HF's padded rows: every row every
        # step, finished ones too (HF's loop, sample_search.py)
        if streamer is not None and len(rows) != 1:
            raise ValueError("streamer supports a single sequence (batch 1, num_return_sequences 1)")
        from .sample_search import sample_search
        if streamer is not None:
            streamer.put(input_ids.cpu())
        out = sample_search(loaded, input_ids, prompts, holes, settings, stop_strings=stops, streamer=streamer)
        if streamer is not None:
            streamer.end()
        return out if settings.return_dict else out.sequences
    if streamer is not None:
        if len(rows) != 1:
            raise ValueError("streamer supports a single sequence (batch 1, num_return_sequences 1)")
        streamer.put(input_ids.cpu())
    # no_repeat_ngram_size and bad_words_ids look at HF's whole row, left padding and masked tokens included
    padded = [r for r in input_ids.tolist() for _ in range(n)]
    full_rows = padded if settings.sampling.no_repeat_ngram_size or settings.sampling.bad_words_ids else None
    new_tokens = _decode_loop(loaded, rows, hole_rows, settings, streamer, full_rows,
                              (stops, padded) if stops is not None else None, speculative)
    if streamer is not None:
        streamer.end()
    width = max(map(len, new_tokens), default=0)
    out = torch.full((len(rows), input_ids.shape[1] + width), settings.fill_token_id, dtype=torch.long)
    out[:, :input_ids.shape[1]] = input_ids.cpu().repeat_interleave(n, dim=0)
    for i, toks in enumerate(new_tokens):
        out[i, input_ids.shape[1]:input_ids.shape[1] + len(toks)] = torch.tensor(toks, dtype=torch.long)
    out = out.to(input_ids.device)
    if settings.return_dict:
        from .hf_decoding import hf_output
        return hf_output("GenerateDecoderOnlyOutput", sequences=out)
    return out


def _speculative(assistant, settings: gen_config.GenerationSettings) -> dict | None:
    """HF's assisted generation as the engine's speculative decoding (its output distribution, and
    greedy output, are the model's own): assistant_model -> a draft model proposing num_assistant_tokens
    (default 4) a step; prompt_lookup_num_tokens -> n-gram prompt lookup (n-grams of up to
    max_matching_ngram_size tokens, HF's default 2)."""
    if assistant is not None and settings.prompt_lookup_num_tokens is not None:
        raise ValueError("generate(): give assistant_model or prompt_lookup_num_tokens, not both (as HF)")
    if assistant is not None:
        return {"method": "draft", "model": assistant, "num_tokens": settings.num_assistant_tokens or 4}
    if settings.prompt_lookup_num_tokens is not None:
        return {"method": "ngram", "num_tokens": settings.prompt_lookup_num_tokens, "prompt_lookup_min": 1,
                "prompt_lookup_max": settings.max_matching_ngram_size or 2}
    return None


def _decode_loop(loaded: LoadedModel, rows: list[list[int]], hole_rows: list[tuple[int, ...]],
                 settings: gen_config.GenerationSettings, streamer, full_rows: list[list[int]] | None = None,
                 stop_strings=None, speculative: dict | None = None) -> list[list[int]]:
    """Run every row as a request of the continuous-batching engine. Returns the new tokens.
    stop_strings: (hf_stop_strings.StopStrings, HF's padded rows): a row ends at the token that completes
    one (its request is aborted; tokens a pipelined step made after it are dropped)."""
    from dataclasses import replace

    from .engine import Engine, EngineConfig
    if settings.max_new_tokens == 0:
        return [[] for _ in rows]
    block_size = 16
    num_blocks = sum(-(-(len(r) + settings.max_new_tokens) // block_size) for r in rows)
    on_gpu = loaded.model.device.type == "cuda"
    # On a GPU the decode steps replay CUDA graphs (batch buckets up to all the rows, sized to this call's
    # longest sequence; captured only when there are a few decode steps to run), and step n + 1 launches
    # before step n is read back.
    engine = Engine(loaded, EngineConfig(num_blocks=num_blocks, block_size=block_size, max_num_seqs=len(rows),
                                         max_num_batched_tokens=max(8192, max(map(len, rows))),
                                         max_model_len=max(map(len, rows)) + settings.max_new_tokens,
                                         enable_prefix_caching=False,
                                         decode_graphs=on_gpu and settings.max_new_tokens > 2,
                                         pipelined_decode=on_gpu, speculative=speculative))
    # HF semantics: EOS ids end a row (after min_new_tokens); the model config's EOS plays no part.
    params = replace(settings.sampling, max_tokens=settings.max_new_tokens, min_tokens=settings.min_new_tokens,
                     stop_token_ids=list(settings.eos_token_ids), ignore_eos=True)
    for i, (row, holes) in enumerate(zip(rows, hole_rows)):
        engine.add_request(str(i), row, params, extra_seen_ids=holes,
                           ngram_history=full_rows[i] if full_rows is not None else None)
    outputs: list[list[int]] = [[] for _ in rows]
    # stop strings (HF): with EOS ids a row that completes one ends there (HF pads it); without, HF does not
    # pad finished rows, so every row runs until all have completed one, the output as wide as the last
    hit: list[int | None] = [None] * len(rows)   # the output length at which each row completed a stop string
    width: int | None = None                      # without EOS ids: every row's length, once all have hit
    done = [False] * len(rows)
    while engine.has_unfinished():
        for out in engine.step():
            row, tokens = int(out.request_id), list(out.outputs[0].token_ids)
            if done[row]:
                continue
            if stop_strings is not None:
                matcher, padded = stop_strings
                tail = 4 * matcher.longest + 8  # tokens enough for any match's window
                for k in range(len(outputs[row]), len(tokens)):
                    if hit[row] is None and matcher.hit(padded[row][-tail:] + tokens[max(0, k + 1 - tail):k + 1]):
                        hit[row] = k + 1
                if settings.eos_token_ids and hit[row] is not None:
                    tokens, done[row] = tokens[:hit[row]], True
                    engine.abort(out.request_id)
                elif not settings.eos_token_ids and width is None and all(h is not None for h in hit):
                    width = max(hit)
                if width is not None and len(tokens) >= width:
                    tokens, done[row] = tokens[:width], True
                    engine.abort(out.request_id)
            if streamer is not None and len(tokens) > len(outputs[row]):
                streamer.put(torch.tensor(tokens[len(outputs[row]):]))
            outputs[row] = tokens
        if width is not None:  # rows already past the common width stop too
            for row in range(len(rows)):
                if not done[row] and len(outputs[row]) >= width:
                    outputs[row], done[row] = outputs[row][:width], True
                    engine.abort(str(row))
    return outputs
