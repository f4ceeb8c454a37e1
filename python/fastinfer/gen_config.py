"""HF-style generation arguments -> fastinfer settings, with HF's precedence and defaults.

Precedence (as in transformers): explicit keyword > ``generation_config`` argument > the model's
own generation config > transformers' global defaults. A keyword fastinfer does not implement is
an error unless it holds the neutral (default) value, or is a sampling warper while do_sample is
False (HF builds no warper then): nothing that would change the output is silently ignored.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch

from . import hf_processors
from .sampling_params import SamplingParams, is_token_sequences

# transformers' GenerationConfig._get_default_generation_params (5.x), for the keys that matter here.
HF_DEFAULTS: dict[str, Any] = {
    "max_length": 20, "max_new_tokens": None, "min_length": 0, "min_new_tokens": None, "do_sample": False,
    "temperature": 1.0, "top_k": 50, "top_p": 1.0, "min_p": None, "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0, "bad_words_ids": None, "suppress_tokens": None,
    "num_return_sequences": 1, "eos_token_id": None, "pad_token_id": None,
    "num_beams": 1, "length_penalty": 1.0, "early_stopping": False,
    "return_dict_in_generate": False, "output_scores": False, "output_logits": False, "stop_strings": None,
    "prompt_lookup_num_tokens": None, "max_matching_ngram_size": None, "num_assistant_tokens": None,
    "max_time": None, "logits_processor": None, "stopping_criteria": None, "prefix_allowed_tokens_fn": None,
    "sequence_bias": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
    "exponential_decay_length_penalty": None, "begin_suppress_tokens": None, "renormalize_logits": False,
    "remove_invalid_values": False,
}
# Unsupported features, allowed only at these neutral values (HF no-ops): the default first, then any
# other value that is a no-op in HF too (classifier-free guidance at scale 1, contrastive search with
# alpha 0, low_memory off).
NEUTRAL: dict[str, tuple] = {
    "num_beam_groups": (1,), "typical_p": (1.0,), "epsilon_cutoff": (0.0,), "eta_cutoff": (0.0,),
    "encoder_no_repeat_ngram_size": (0,), "encoder_repetition_penalty": (1.0,),
    "force_words_ids": (None,), "constraints": (None,),
    "diversity_penalty": (0.0,), "penalty_alpha": (None, 0.0),
    "guidance_scale": (None, 1.0), "output_attentions": (False,), "output_hidden_states": (False,),
    "watermarking_config": (None,),
    "dola_layers": (None,), "top_h": (None,), "token_healing": (False,), "low_memory": (None, False),
    "use_mtp": (None,),
}
# Sampling warpers fastinfer does not implement: HF builds them only when do_sample is True, so with
# greedy decoding any value is a no-op; with sampling only the neutral values are accepted.
SAMPLING_ONLY = {"typical_p", "epsilon_cutoff", "eta_cutoff", "top_h"}
# generate()'s own arguments, not GenerationConfig fields: not read from the model's generation config.
GENERATE_ONLY = {"logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn"}
# Keys whose explicit None keyword means "none" in HF (generation_config.update(**kwargs) sets it),
# not "unset": eos_token_id=None turns stopping on EOS off even where the model has an EOS, top_k=None
# builds no top-k warper even where the model's config sets one; the value each then takes here.
# do_sample=None is falsy in HF (greedy, whatever the model's config says); min_length=None builds no
# MinLengthLogitsProcessor.
NONE_OVERRIDES = {"eos_token_id": None, "pad_token_id": None, "max_new_tokens": None, "min_new_tokens": None,
                  "top_k": 0, "temperature": 1.0, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0,
                  "do_sample": False, "min_length": 0, "max_time": None, "suppress_tokens": None,
                  "bad_words_ids": None, "sequence_bias": None, "forced_bos_token_id": None,
                  "forced_eos_token_id": None, "exponential_decay_length_penalty": None, "begin_suppress_tokens": None,
                  "renormalize_logits": False, "remove_invalid_values": False}
_EXPLICIT_NONE = object()
# Accepted and without effect here (caching and compilation are fastinfer's own business).
IGNORED = {"use_cache", "cache_implementation", "cache_config", "max_cache_len", "bos_token_id",
           "decoder_start_token_id", "transformers_version", "_from_model_config", "compile_config",
           "disable_compile", "is_assistant", "num_assistant_tokens_schedule",
           "assistant_confidence_threshold", "assistant_lookbehind", "target_lookbehind", "assistant_early_exit",
           "assistant_ensemble_weight", "speculation_type", "prefill_chunk_size",
           "continuous_batching_config", "tokenizer", "_commit_hash", "trust_remote_code", "generation_kwargs",
           "synced_gpus"}


@dataclass
class GenerationSettings:
    max_new_tokens: int
    min_new_tokens: int
    sampling: SamplingParams      # per-row sampling; n handled by the caller (num_return_sequences)
    eos_token_ids: list[int]
    pad_token_id: int | None      # HF's: None when neither given nor in the configs (no mask inferred)
    num_return_sequences: int
    num_beams: int = 1            # > 1: beam search (beam_search.py), greedy only
    length_penalty: float = 1.0   # beam search: a finished beam's score is its logprob sum / length ** this
    early_stopping: bool | str = False  # beam search: True, False (HF's heuristic) or "never"
    return_dict: bool = False     # return_dict_in_generate: HF's output object instead of the tensor
    output_scores: bool = False   # with return_dict: the processed scores per step (HF's loops, beam_search.py)
    output_logits: bool = False   # with return_dict: the raw logits per step
    stop_strings: list[str] | None = None  # HF's stop_strings (hf_stop_strings.py; needs generate's tokenizer=)
    # HF's assisted generation as fastinfer's speculative decoding: prompt lookup (k tokens, n-grams up to
    # max_matching_ngram_size) or generate's assistant_model (num_assistant_tokens a step)
    prompt_lookup_num_tokens: int | None = None
    max_matching_ngram_size: int | None = None
    num_assistant_tokens: int | None = None
    # generate()'s logits_processor / stopping_criteria lists (HF objects or any callables of (input_ids,
    # scores)), prefix_allowed_tokens_fn and max_time: HF's own loops run them (hf_hooks.py)
    logits_processor: tuple = ()
    stopping_criteria: tuple = ()
    prefix_allowed_tokens_fn: Any = None
    max_time: float | None = None
    # HF's TypicalLogitsWarper / EpsilonLogitsWarper / EtaLogitsWarper ("typical_p", "epsilon_cutoff",
    # "eta_cutoff" -> value) with do_sample, after its other warpers, and TopHLogitsWarper ("top_h") after the
    # temperature (hf_decoding.hf_warpers)
    warpers: dict = field(default_factory=dict)
    # HF's SequenceBiasLogitsProcessor ((token ids, bias) pairs, first of HF's processors) and its forced first /
    # last token (ForcedBOSTokenLogitsProcessor when the padded prompt is 1 token, ForcedEOSTokenLogitsProcessor at
    # the last step), in HF's loops (hf_hooks.py)
    sequence_bias: tuple = ()
    forced_bos_token_id: int | None = None
    forced_eos_token_id: tuple = ()
    # HF's ExponentialDecayLengthPenalty ((start index, factor)), SuppressTokensAtBeginLogitsProcessor's tokens and
    # LogitNormalization (renormalize_logits: a log_softmax after every processor and warper; it changes the
    # scores HF returns, not the tokens, so it alone does not need HF's loop)
    exponential_decay: tuple | None = None
    begin_suppress_tokens: tuple = ()
    renormalize_logits: bool = False
    remove_invalid_values: bool = False  # HF's InfNanRemoveLogitsProcessor, after the forced tokens

    @property
    def hf_hooks(self) -> bool:
        """Whether HF's loop must run: custom processors / criteria, a prefix constraint, max_time, the typical /
        epsilon / eta warpers, sequence_bias or a forced BOS / EOS token (which the engine's sampler does not have)."""
        return bool(self.logits_processor or self.stopping_criteria or self.prefix_allowed_tokens_fn is not None
                    or self.max_time is not None or self.warpers or self.sequence_bias
                    or self.forced_bos_token_id is not None or self.forced_eos_token_id
                    or self.exponential_decay is not None or self.begin_suppress_tokens or self.remove_invalid_values)

    @property
    def fill_token_id(self) -> int:
        """What finished rows of the output are padded with."""
        return self.pad_token_id if self.pad_token_id is not None else 0


def _layer(source: dict | None, where: str, merged: dict, explicit_none: bool = False,
           sampling_only: dict | None = None) -> None:
    for key, value in (source or {}).items():
        if value is None and explicit_none and key in NONE_OVERRIDES:
            merged[key] = _EXPLICIT_NONE
            continue
        if key in SAMPLING_ONLY and sampling_only is not None:
            if value is None and explicit_none:  # HF: the keyword's None turns the warper off
                sampling_only.pop(key, None)
            elif value is not None and not any(value == v for v in NEUTRAL[key]):
                sampling_only[key] = (value, where)  # checked once do_sample is known
            elif value is not None:
                sampling_only.pop(key, None)
            continue
        if value is None or key in IGNORED:
            continue
        if key in NEUTRAL:
            if not any(value == v for v in NEUTRAL[key]):
                raise ValueError(f"generate(): {key}={value!r} is not supported by fastinfer (from {where})")
            continue
        if key not in HF_DEFAULTS:
            raise ValueError(f"generate(): unsupported argument {key!r} (from {where})")
        merged[key] = value


def _token_ids(value, name: str, minimum: int | None = 0) -> list[int]:
    """An HF special-token argument (an int, a list / tuple of ints, or a LongTensor) as a list of ids."""
    if isinstance(value, torch.Tensor):
        if value.dtype.is_floating_point or value.dtype == torch.bool or value.dim() > 1:
            raise ValueError(f"{name} must be an int, a list of ints or a 1-D integer tensor, got {value!r}")
        value = value.tolist()
    ids = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(ids, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"{name} must be an int, a list of ints or a 1-D integer tensor, got {value!r}")
    if minimum is not None and any(i < minimum for i in ids):
        raise ValueError(f"{name} must hold token ids >= {minimum}, got {value!r} (HF warns and never stops on "
                         f"a negative id; fastinfer refuses it)")
    return list(ids)


def resolve(model_defaults: dict | None, generation_config, kwargs: dict, prompt_width: int,
            config_eos: list[int], config_pad: int | None, max_position: int | None = None) -> GenerationSettings:
    """config_eos / config_pad: the model config's, used only where no layer sets eos / pad."""
    merged = dict(HF_DEFAULTS)
    sampling_only: dict[str, tuple] = {}
    model_layer = {k: v for k, v in (model_defaults or {}).items()
                   if (k in HF_DEFAULTS or k in NEUTRAL) and k not in GENERATE_ONLY}
    _layer(model_layer, "the model's generation config", merged, sampling_only=sampling_only)
    gc = None
    if generation_config is not None:
        gc = generation_config if isinstance(generation_config, dict) else generation_config.to_dict()
        _layer(gc, "generation_config", merged, sampling_only=sampling_only)
    _layer(kwargs, "keyword arguments", merged, explicit_none=True, sampling_only=sampling_only)
    # HF (generate's has_default_max_length): max_length set in no layer at all, even to 20, means "20 new"
    default_max_length = all((layer or {}).get("max_length") is None for layer in (model_layer, gc, kwargs))
    for key, off in NONE_OVERRIDES.items():  # eos / pad keep the marker: resolved below
        if merged[key] is _EXPLICIT_NONE and key not in ("eos_token_id", "pad_token_id"):
            merged[key] = off

    if merged["max_new_tokens"] is not None:
        max_new = merged["max_new_tokens"]
    elif default_max_length:
        # HF (_prepare_generated_length): the default max_length of 20 means 20 new tokens, the total
        # capped at max_position_embeddings
        total = merged["max_length"] + prompt_width
        max_new = (min(total, max_position) if max_position is not None else total) - prompt_width
    else:
        max_new = merged["max_length"] - prompt_width
    if not isinstance(max_new, int) or max_new < 1:  # HF raises too: nothing would be generated
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new!r} "
                         f"(max_length={merged['max_length']}, prompt width {prompt_width})")
    min_new = merged["min_new_tokens"]
    if min_new is None:
        min_new = max(0, (merged["min_length"] or 0) - prompt_width)
    if not isinstance(min_new, int) or min_new < 0:
        raise ValueError(f"min_new_tokens must be an integer >= 0, got {min_new!r}")
    min_new = min(min_new, max_new)  # HF warns and generates max_new_tokens, EOS suppressed throughout

    eos = merged["eos_token_id"]
    if eos is _EXPLICIT_NONE:
        eos = []
    else:
        eos = list(config_eos or []) if eos is None else _token_ids(eos, "eos_token_id")
    pad = merged["pad_token_id"]
    if pad is _EXPLICIT_NONE or pad is None:
        pad = config_pad if pad is None and config_pad is not None else (eos[0] if eos else None)
    else:
        pad_ids = _token_ids(pad, "pad_token_id", minimum=None)  # any int: HF fills finished rows with it
        if isinstance(pad, (list, tuple)) or len(pad_ids) != 1:
            raise ValueError(f"pad_token_id must be a single token id, got {pad!r}")
        pad = pad_ids[0]
    n = merged["num_return_sequences"]
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"num_return_sequences must be an integer >= 1, got {n!r}")

    temperature, top_k = merged["temperature"], merged["top_k"]
    if merged["do_sample"]:  # greedy ignores the warpers, whatever their values (as HF)
        if temperature is not None and temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
    warpers = {}  # HF's typical / epsilon / eta warpers, with do_sample (HF's loop runs them: hf_decoding.py)
    if merged["do_sample"]:
        for key in ("typical_p", "epsilon_cutoff", "eta_cutoff", "top_h"):
            if key in sampling_only:
                value, where = sampling_only.pop(key)
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ValueError(f"{key} must be a number, got {value!r} (from {where})")
                if key == "typical_p" and value < 1.0 and not value > 0:  # as HF's TypicalLogitsWarper
                    raise ValueError(f"`typical_p` has to be a float > 0 and < 1, but is {value} (from {where})")
                if key == "top_h" and not 0 < value <= 1:  # as HF's TopHLogitsWarper
                    raise ValueError(f"`top_h` must be in the range (0, 1], got {value} (from {where})")
                # HF builds them for typical_p < 1, cutoffs in (0, 1) and any top_h, and skips other values
                if key == "top_h" or ((value < 1.0) if key == "typical_p" else (0.0 < value < 1.0)):
                    warpers[key] = float(value)
    if merged["do_sample"] and sampling_only:
        key, (value, where) = next(iter(sampling_only.items()))
        raise ValueError(f"generate(): {key}={value!r} is not supported by fastinfer with do_sample=True (from {where})")
    beams, length_penalty, early_stopping = merged["num_beams"], merged["length_penalty"], merged["early_stopping"]
    if not isinstance(beams, int) or isinstance(beams, bool) or beams < 1:
        raise ValueError(f"num_beams must be an integer >= 1, got {beams!r}")
    if isinstance(length_penalty, bool) or not isinstance(length_penalty, (int, float)) or length_penalty != length_penalty:
        raise ValueError(f"length_penalty must be a number, got {length_penalty!r}")
    if early_stopping not in (True, False, "never") or not isinstance(early_stopping, (bool, str)):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    stop_strings = merged["stop_strings"]
    if isinstance(stop_strings, str):
        stop_strings = [stop_strings]
    if stop_strings is not None and (not isinstance(stop_strings, (list, tuple)) or not stop_strings
                                     or not all(isinstance(x, str) and x for x in stop_strings)):
        raise ValueError(f"stop_strings must be a non-empty string or a list of them, got {merged['stop_strings']!r}")
    for key in ("prompt_lookup_num_tokens", "max_matching_ngram_size", "num_assistant_tokens"):
        value = merged[key]
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
    flags = {key: merged[key] for key in ("return_dict_in_generate", "output_scores", "output_logits")}
    for key, value in flags.items():
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be True or False, got {value!r}")
    if beams > 1 and n > beams:  # as HF
        raise ValueError(f"num_return_sequences ({n}) must be <= num_beams ({beams})")
    if n > 1 and not merged["do_sample"] and beams == 1:  # as HF: n greedy copies would be identical
        raise ValueError(f"num_return_sequences={n} needs do_sample=True or num_beams >= {n} (greedy rows would be "
                         f"identical)")
    if merged["do_sample"] and temperature == 0:
        raise ValueError("temperature must be > 0 when do_sample=True (use do_sample=False for greedy)")
    # HF's NoBadWordsLogitsProcessor drops one-token bad words that are an EOS id; SuppressTokens does not.
    # One-token bans (static) become a -inf logit_bias, which pipelined decode keeps; longer ones depend on
    # the row's last tokens (bad_words_ids). Ids past the vocabulary are refused (HF never matches them).
    bad = merged["bad_words_ids"]
    if bad is not None and not is_token_sequences(bad):
        raise ValueError(f"bad_words_ids must be a list of non-empty lists of token ids >= 0, got {bad!r:.120}")
    bad = [list(w) for w in bad or () if not (len(w) == 1 and w[0] in eos)]
    suppressed = merged["suppress_tokens"] or []
    suppressed = _token_ids(suppressed, "suppress_tokens") if not isinstance(suppressed, list) else suppressed
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in suppressed):
        raise ValueError(f"suppress_tokens must be a list of token ids >= 0, got {suppressed!r:.120}")
    banned = {w[0]: float("-inf") for w in bad if len(w) == 1} | {t: float("-inf") for t in suppressed}
    longer = [w for w in bad if len(w) > 1] or None
    ngram = merged["no_repeat_ngram_size"] or 0  # HF: None or 0 builds no processor
    if not isinstance(ngram, int) or isinstance(ngram, bool) or ngram < 0:
        raise ValueError(f"no_repeat_ngram_size must be an integer >= 0, got {ngram!r}")
    if merged["do_sample"]:
        sampling = SamplingParams(
            # top_p 0 keeps one token in HF (min_tokens_to_keep); SamplingParams takes (0, 1]
            temperature=float(temperature), top_k=int(top_k or 0), top_p=max(float(merged["top_p"]), 1e-9),
            min_p=float(merged["min_p"] or 0.0), repetition_penalty=float(merged["repetition_penalty"]),
            no_repeat_ngram_size=ngram, bad_words_ids=longer, logit_bias=banned or None, max_tokens=None)
    else:  # greedy: HF ignores the sampling warpers, keeps the penalties
        sampling = SamplingParams(temperature=0.0, repetition_penalty=float(merged["repetition_penalty"]),
                                  no_repeat_ngram_size=ngram, bad_words_ids=longer, logit_bias=banned or None,
                                  max_tokens=None)
    hooks = _hooks(merged, eos, stop_strings, ngram)
    hooks["warpers"] = warpers
    hooks.update(hf_processors.settings_from(merged, eos, suppressed))
    return GenerationSettings(max_new, min_new, sampling, eos, pad, n, beams, float(length_penalty), early_stopping,
                              flags["return_dict_in_generate"],
                              flags["return_dict_in_generate"] and flags["output_scores"],
                              flags["return_dict_in_generate"] and flags["output_logits"],
                              list(stop_strings) if stop_strings else None, merged["prompt_lookup_num_tokens"],
                              merged["max_matching_ngram_size"], merged["num_assistant_tokens"], **hooks)


def _hooks(merged: dict, eos: list[int], stop_strings, ngram: int) -> dict:
    """generate()'s logits_processor / stopping_criteria / prefix_allowed_tokens_fn and max_time, checked.
    HF merges a custom processor or criterion into the list it builds, the custom one replacing a built
    one of the same type; fastinfer builds its own equivalents, so such a duplicate is refused by name."""
    hooks = {}
    for key in ("logits_processor", "stopping_criteria"):
        value = merged[key]
        if value is None:
            hooks[key] = ()
            continue
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__") or not all(callable(f) for f in value):
            raise ValueError(f"{key} must be a list of callables (HF LogitsProcessor / StoppingCriteria objects), "
                             f"got {value!r:.120}")
        hooks[key] = tuple(value)
    fn = merged["prefix_allowed_tokens_fn"]
    if fn is not None and not callable(fn):
        raise ValueError(f"prefix_allowed_tokens_fn must be a callable (batch_id, input_ids) -> allowed token ids, "
                         f"got {fn!r:.120}")
    hooks["prefix_allowed_tokens_fn"] = fn
    max_time = merged["max_time"]
    if max_time is not None and (isinstance(max_time, bool) or not isinstance(max_time, (int, float))
                                 or not 0 <= max_time < float("inf")):
        raise ValueError(f"max_time must be a number of seconds >= 0 or None, got {max_time!r}")
    hooks["max_time"] = None if max_time is None else float(max_time)
    built = {  # what HF's _get_logits_processor / _get_stopping_criteria build for these settings
        "RepetitionPenaltyLogitsProcessor": merged["repetition_penalty"] not in (None, 1.0),
        "NoRepeatNGramLogitsProcessor": ngram > 0,
        "NoBadWordsLogitsProcessor": merged["bad_words_ids"] is not None,
        # HF sets min_length = width + min_new_tokens whenever min_new_tokens is given, 0 included
        "MinLengthLogitsProcessor": bool(eos) and (bool(merged["min_length"]) or merged["min_new_tokens"] is not None),
        "MinNewTokensLengthLogitsProcessor": bool(eos) and bool(merged["min_new_tokens"]),
        "SuppressTokensLogitsProcessor": merged["suppress_tokens"] is not None,
        "PrefixConstrainedLogitsProcessor": fn is not None,
        "SequenceBiasLogitsProcessor": merged["sequence_bias"] is not None,
        "ForcedBOSTokenLogitsProcessor": merged["forced_bos_token_id"] is not None,
        "ForcedEOSTokenLogitsProcessor": merged["forced_eos_token_id"] is not None,
        "ExponentialDecayLengthPenalty": merged["exponential_decay_length_penalty"] is not None,
        "SuppressTokensAtBeginLogitsProcessor": merged["begin_suppress_tokens"] is not None,
        "LogitNormalization": merged["renormalize_logits"] is True,
        "InfNanRemoveLogitsProcessor": merged["remove_invalid_values"] is True,
        "MaxLengthCriteria": True, "EosTokenCriteria": bool(eos), "StopStringCriteria": bool(stop_strings),
        "MaxTimeCriteria": max_time is not None,
    }
    for key in ("logits_processor", "stopping_criteria"):
        for f in hooks[key]:
            name = type(f).__name__
            if built.get(name) and type(f).__module__.startswith("transformers."):
                raise ValueError(f"generate(): the {name} in {key} would replace the one HF builds from the "
                                 f"generation settings (this call's or the model's generation config); fastinfer "
                                 f"builds its own, so it takes one of the two: drop the custom one or neutralize the "
                                 f"setting it duplicates")
            if key == "logits_processor" and _parameter_count(f) > 2:
                raise ValueError(f"generate(): the {name} in logits_processor takes arguments beyond (input_ids, "
                                 f"scores), which HF cannot pass it either")
    if fn is not None and merged["suppress_tokens"]:
        raise ValueError("generate(): prefix_allowed_tokens_fn with suppress_tokens is not supported (HF applies "
                         "the constraint's fallback for an unsatisfiable step before suppress_tokens)")
    return hooks


def _parameter_count(f) -> int:
    """Parameters of f.__call__ as HF's LogitsProcessorList counts them (0 when inspect cannot tell)."""
    try:
        return len(inspect.signature(f.__call__).parameters)
    except (TypeError, ValueError):
        return 0

