"""Per-request sampling settings (vLLM-like), validated on construction."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .structured import StructuredOutputsParams

kMaxSeed = 2**64  # torch.Generator.manual_seed accepts seeds below this


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_int(name: str, value, minimum: int) -> None:
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_optional_int(name: str, value, minimum: int) -> None:
    if value is not None:
        _check_int(name, value, minimum)


def _check_number(name: str, value, low: float, high: float, rule: str) -> None:
    # Written as `not (low <= value <= high)` so that NaN fails too.
    if not _is_number(value) or not (low <= value <= high):
        raise ValueError(f"{name} must be {rule}, got {value!r}")


def is_token_sequences(words) -> bool:
    """A list of non-empty lists of token ids >= 0 (bad_words_ids; gen_config checks HF's argument with it)."""
    return isinstance(words, (list, tuple)) and all(
        isinstance(w, (list, tuple)) and w and all(_is_int(t) and t >= 0 for t in w) for w in words)


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")


# Temperatures below this are not divided by (logits of magnitude up to ~1e8 / T would overflow fp32 to
# inf, then NaN): such a row samples among its tied maxima, the T -> 0 limit (sampling.py). Above it the
# logits are divided as HF does.
kTinyTemperature = 1e-30

@dataclass(slots=True)
class SamplingParams:
    n: int = 1
    max_tokens: int | None = 16
    min_tokens: int = 0
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 or -1: disabled
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF semantics: every token in prompt + output
    presence_penalty: float = 0.0  # OpenAI semantics: output tokens only
    frequency_penalty: float = 0.0  # OpenAI semantics: output tokens only
    seed: int | None = None
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    # vLLM's fields, same meaning
    # True: a matched stop string stays at the end of the text (a stop token's text always shows unless special)
    include_stop_str_in_output: bool = False
    detokenize: bool = True               # False: no text (""), no stop strings, no decoded logprob tokens
    truncate_prompt_tokens: int | None = None  # keep only the prompt's last k tokens
    # accepted at vLLM's default only: True is what a fast tokenizer's decode does
    spaces_between_special_tokens: bool = True
    # per prompt token, its logprob and the k most likely tokens' given the tokens before it
    # (RequestOutput.prompt_logprobs; such a request takes no prefix-cache hits until they are computed)
    prompt_logprobs: int | None = None
    # {token id: bias} added to that token's logit before penalties and sampling (greedy too)
    logit_bias: dict[int, float] | None = None
    # only these token ids may be generated (the others' logits are -inf), e.g. a classifier's labels
    allowed_token_ids: list[int] | None = None
    # HF's no_repeat_ngram_size (not a vLLM field): no n-gram of this size occurs twice in prompt + output
    # (a token that would complete one already seen gets -inf); 0: off. Not with speculative decoding.
    no_repeat_ngram_size: int = 0
    # HF's bad_words_ids (not a vLLM field): token sequences that must not be generated; the last token of
    # one gets -inf whenever prompt + output end with the rest of it (a single token: always). EOS ids are
    # not filtered here (fastinfer.generate drops [eos] entries as HF does). Not with speculative decoding.
    bad_words_ids: list[list[int]] | None = None
    # vLLM's bad_words: words that must not be generated. The engine tokenizes each as vLLM does (the word,
    # and with a leading space when that starts with another token and has as many) and bans a word's last
    # token whenever the output ends with the rest of it (a one-token word: always). Matched against the
    # output only, as vLLM. Needs a tokenizer; not with speculative decoding or structured outputs.
    bad_words: list[str] | None = None
    # bad_words tokenized (the engine fills it, as vLLM's private field of the same name)
    _bad_words_token_ids: list[list[int]] | None = field(default=None, repr=False)
    # vLLM's structured outputs: the output matches a JSON schema, a regex or one of a list of strings
    # (fastinfer.structured). guided_decoding is vLLM's earlier name for the same field.
    structured_outputs: StructuredOutputsParams | None = None
    guided_decoding: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        _check_int("n", self.n, 1)
        _check_optional_int("max_tokens", self.max_tokens, 1)
        _check_int("min_tokens", self.min_tokens, 0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}")
        _check_number("temperature", self.temperature, 0.0, math.inf, ">= 0")
        if self.temperature == math.inf:
            raise ValueError(f"temperature must be finite, got {self.temperature!r}")
        _check_int("top_k", self.top_k, -1)
        if not _is_number(self.top_p) or not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        _check_number("min_p", self.min_p, 0.0, 1.0, "in [0, 1]")
        if not _is_number(self.repetition_penalty) or not (0.0 < self.repetition_penalty < math.inf):
            raise ValueError(
                f"repetition_penalty must be > 0 and finite, got {self.repetition_penalty!r}")
        _check_number("presence_penalty", self.presence_penalty, -2.0, 2.0, "in [-2, 2]")
        _check_number("frequency_penalty", self.frequency_penalty, -2.0, 2.0, "in [-2, 2]")
        if self.seed is not None and (not _is_int(self.seed) or not (0 <= self.seed < kMaxSeed)):
            raise ValueError(f"seed must be None or an int in [0, 2**64), got {self.seed!r}")
        self.stop = self._validated_stop(self.stop)
        self.stop_token_ids = self._validated_stop_token_ids(self.stop_token_ids)
        _check_bool("ignore_eos", self.ignore_eos)
        _check_optional_int("logprobs", self.logprobs, 0)
        _check_bool("skip_special_tokens", self.skip_special_tokens)
        _check_bool("include_stop_str_in_output", self.include_stop_str_in_output)
        _check_bool("detokenize", self.detokenize)
        if self.stop and not self.detokenize:
            raise ValueError("stop strings need detokenize=True (they are matched against the text)")
        _check_optional_int("truncate_prompt_tokens", self.truncate_prompt_tokens, 1)
        if self.spaces_between_special_tokens is not True:
            raise ValueError(f"spaces_between_special_tokens={self.spaces_between_special_tokens!r} is not "
                             f"supported (only the default True)")
        _check_optional_int("prompt_logprobs", self.prompt_logprobs, 0)
        if self.logit_bias is not None:  # -inf bans a token; finite values within fp32's reach of any logit
            if not isinstance(self.logit_bias, dict) or not all(
                    _is_int(t) and t >= 0 and _is_number(b) and (-1e4 <= b <= 1e4 or b == -math.inf)
                    for t, b in self.logit_bias.items()):
                raise ValueError(f"logit_bias must be None or a dict of token id (int >= 0) -> a number in "
                                 f"[-1e4, 1e4] or -inf, got {self.logit_bias!r:.120}")
            self.logit_bias = {t: float(b) for t, b in self.logit_bias.items()}
        _check_int("no_repeat_ngram_size", self.no_repeat_ngram_size, 0)
        if self.bad_words_ids is not None:
            words = self.bad_words_ids
            if not is_token_sequences(words):
                raise ValueError(f"bad_words_ids must be None or a list of non-empty lists of token ids >= 0, got "
                                 f"{words!r:.120}")
            self.bad_words_ids = [list(w) for w in words]
        if self.bad_words is not None:
            words = [self.bad_words] if isinstance(self.bad_words, str) else self.bad_words
            if not isinstance(words, (list, tuple)) or not all(isinstance(w, str) and w.strip() for w in words):
                raise ValueError(f"bad_words must be None or a list of words (non-blank strings), got {words!r:.120}")
            self.bad_words = list(words)
        if self._bad_words_token_ids is not None and not is_token_sequences(self._bad_words_token_ids):
            raise ValueError("_bad_words_token_ids must be a list of non-empty lists of token ids >= 0")
        if self.guided_decoding is not None:
            if not isinstance(self.guided_decoding, StructuredOutputsParams):
                raise ValueError(f"guided_decoding must be a fastinfer.GuidedDecodingParams, got "
                                 f"{type(self.guided_decoding).__name__}")
            if self.structured_outputs is not None and self.structured_outputs is not self.guided_decoding:
                raise ValueError("give structured_outputs or guided_decoding (its earlier name), not both")
            self.structured_outputs = self.guided_decoding
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise ValueError(f"structured_outputs must be a fastinfer.StructuredOutputsParams, got "
                             f"{type(self.structured_outputs).__name__}")
        if self.allowed_token_ids is not None:
            ids = self.allowed_token_ids
            if not isinstance(ids, (list, tuple)) or not ids or not all(_is_int(i) and i >= 0 for i in ids):
                raise ValueError(f"allowed_token_ids must be None or a non-empty list of ints >= 0, got {ids!r:.120}")
            self.allowed_token_ids = list(ids)

    @staticmethod
    def _validated_stop(stop) -> list[str] | None:
        if stop is None:
            return None
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must be None, a non-empty str or a list of them, got {stop!r}")
        return list(stop)

    @staticmethod
    def _validated_stop_token_ids(ids) -> list[int] | None:
        if ids is None:
            return None
        if not isinstance(ids, (list, tuple)) or not all(_is_int(i) and i >= 0 for i in ids):
            raise ValueError(f"stop_token_ids must be None or a list of ints >= 0, got {ids!r}")
        return list(ids)

    @property
    def greedy(self) -> bool:
        """Argmax, first index on ties. Only temperature 0: top_k = 1 or a tiny temperature still sample
        among tied maxima, as HF's warpers do (ties are common in bf16 logits)."""
        return self.temperature == 0
