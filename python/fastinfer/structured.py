"""Structured outputs (vLLM's ``StructuredOutputsParams``): generation constrained to a regular
expression, to one of a list of strings, to a JSON schema, or to any JSON object (json_object).

Every constraint becomes a regular expression (a JSON schema through json_schema.py), the
expression a character automaton (the ``interegular`` package), and the automaton a token automaton
over the tokenizer's vocabulary (``TokenGuide``): from a state, a token is allowed when walking its
text through the automaton never dies, and EOS is allowed in accepting states. The walk runs for all
tokens at once (numpy, grouped by token length) the first time a state is reached and is cached, so a
decode step costs a lookup and a masked_fill of the allowed tokens' mask. A token whose text is not
whole characters (a piece of a multi-byte UTF-8 character) or is a special token is never allowed.

The engine applies the mask to the row's logits before sampling (greedy too), and advances the
sequence's state with each token it appends. A sequence from whose state no token continues ends there:
"stop" when its output is complete (the structure is finished and no stop token is allowed, e.g. with
ignore_eos), "abort" otherwise (a rare tokenizer gap; its stop_reason says so). Such sequences are not
pipelined (the next mask depends on the token just sampled); speculative decoding, min_tokens,
allowed_token_ids, bad_words_ids and -inf logit_bias entries (which could forbid every token the
structure allows) are refused with them.
"""
from __future__ import annotations

import json
import re
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from .json_schema import DEFAULT_WHITESPACE, json_object_regex, json_schema_regex, strip_anchors

@dataclass
class StructuredOutputsParams:
    """What a request's output must look like; exactly one of json, regex, choice (vLLM's fields).

    json: a JSON schema (dict or JSON text): objects (properties, required, additionalProperties
    false), arrays (items, minItems, maxItems), strings (minLength, maxLength, pattern, format date /
    time / date-time / uuid), integers, numbers, booleans, null, enum, const, anyOf / oneOf, local $ref.
    regex: Python regular-expression syntax, matched in full. choice: the output is one of these strings.
    json_object=True: any JSON object, its objects and arrays nested at most json_schema.JSON_OBJECT_DEPTH (3)
    levels deep (the outer object counts; a regular expression needs a bound).
    whitespace_pattern: the regex allowed between JSON tokens (default: at most one space).
    grammar is a vLLM field fastinfer does not implement: setting it is an error."""
    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    whitespace_pattern: str | None = None
    _pattern: str | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.grammar is not None:
            raise ValueError("structured_outputs: grammar is not supported by fastinfer (use json, regex or choice)")
        if self.json_object is not None and not isinstance(self.json_object, bool):
            raise ValueError(f"structured_outputs: json_object must be True, False or None, got {self.json_object!r}")
        given = [name for name in ("json", "regex", "choice") if getattr(self, name) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValueError(f"structured_outputs needs exactly one of json, regex, choice, json_object; got "
                             f"{', '.join(given) or 'none'}")
        ws = DEFAULT_WHITESPACE if self.whitespace_pattern is None else self.whitespace_pattern
        if not isinstance(ws, str):
            raise ValueError(f"structured_outputs: whitespace_pattern must be a str, got {ws!r}")
        if self.json_object:
            self._pattern = json_object_regex(ws)
        elif self.json is not None:
            schema = self.json
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except json.JSONDecodeError as e:
                    raise ValueError(f"structured_outputs: json is not valid JSON: {e}") from None
            if not isinstance(schema, dict):
                raise ValueError(f"structured_outputs: json must be a JSON schema object, got {schema!r:.80}")
            self._pattern = json_schema_regex(schema, ws)
        elif self.regex is not None:
            if not isinstance(self.regex, str):
                raise ValueError(f"structured_outputs: regex must be a str, got {self.regex!r:.80}")
            self._pattern = strip_anchors(self.regex)  # the whole output matches anyway
        else:
            if (not isinstance(self.choice, (list, tuple)) or not self.choice
                    or not all(isinstance(c, str) and c for c in self.choice)):
                raise ValueError(f"structured_outputs: choice must be a non-empty list of non-empty strings, got "
                                 f"{self.choice!r:.80}")
            self._pattern = "|".join(f"(?:{re.escape(c)})" for c in self.choice)
        which = given[0]
        try:
            re.compile(self._pattern)
        except re.error as e:
            raise ValueError(f"structured_outputs: {which} gives an invalid regular expression: {e}") from None

    @property
    def pattern(self) -> str:
        """The regular expression the whole output must match."""
        return self._pattern


GuidedDecodingParams = StructuredOutputsParams  # vLLM's earlier name


# ---- token automaton ------------------------------------------------------------------------------------

class Vocabulary:
    """Each token id's text as it appears inside an output (None: a special token, or not whole
    characters), grouped by length as arrays of code points for TokenGuide's walks.

    A token's text is what it adds after another token: decode(anchor, token) minus decode(anchor), so
    SentencePiece's leading-space marker counts whatever the tokenizer's decoder does with a first token,
    and byte-fallback tokens (<0x41>) are their character."""

    def __init__(self, tokenizer, vocab_size: int):
        self.size = vocab_size
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        added = getattr(tokenizer, "added_tokens_decoder", None) or {}
        special |= {i for i, tok in added.items() if getattr(tok, "special", False)}
        vocab = tokenizer.get_vocab()
        anchor = next((t for t in ("a", "x", "0") if t in vocab), None) or next(
            t for t, i in vocab.items() if i not in special)
        prefix = tokenizer.convert_tokens_to_string([anchor])
        texts: list[str | None] = [None] * vocab_size
        for token, i in vocab.items():
            if 0 <= i < vocab_size and i not in special:
                texts[i] = _token_text(tokenizer, anchor, prefix, token)
        self.texts = texts
        by_length: dict[int, list[int]] = {}
        for i, text in enumerate(texts):
            if text:  # "" (and None) never allowed: it would not advance the output
                by_length.setdefault(len(text), []).append(i)
        self.buckets = [(np.array(ids, dtype=np.int64),
                         np.array([[ord(c) for c in texts[i]] for i in ids], dtype=np.int64).reshape(len(ids), length))
                        for length, ids in sorted(by_length.items())]
        self.max_code = max((int(codes.max()) for _, codes in self.buckets), default=0)
        self.chars = {c for text in texts if text for c in text}


def _token_text(tokenizer, anchor: str, prefix: str, token: str) -> str | None:
    text = tokenizer.convert_tokens_to_string([anchor, token])
    if not text.startswith(prefix):
        return None
    text = text[len(prefix):]
    return None if "\ufffd" in text else text  # U+FFFD: a piece of a multi-byte character


class TokenGuide:
    """The token automaton of one regular expression over one vocabulary (see the module docstring).

    Characters no token can produce whole (an emoji a byte-level vocabulary holds only as byte pieces)
    are removed from the character automaton first, and so are the states from which the pattern can
    then no longer be completed: a pattern that needs such a character is refused here, and no token
    leads into a state that could not be finished. mask() of a state from which no token continues is
    all False: the engine ends such a sequence ("stop" when the output is complete, else "abort")."""

    def __init__(self, pattern: str, vocab: Vocabulary, stop_ids: set[int]):
        try:
            import interegular
            from interegular.fsm import anything_else
        except ImportError:
            raise ValueError("structured_outputs needs the interegular package (pip install interegular)") from None
        try:
            fsm = interegular.parse_pattern(pattern).to_fsm()
        except Exception as e:  # interegular raises its own types for syntax it does not take
            raise ValueError(f"structured_outputs: cannot compile the regular expression: {e}") from None
        states = sorted(fsm.states)
        index = {s: i for i, s in enumerate(states)}
        dead = len(states)
        symbols = max(fsm.alphabet.values(), default=-1) + 1
        # the symbols some token can produce: a character of the alphabet seen whole in a token's text, or
        # anything_else when a token's text has a character outside the alphabet
        named = {ch: sym for ch, sym in fsm.alphabet.items() if ch is not anything_else}
        producible = {sym for ch, sym in named.items() if ch in vocab.chars}
        if anything_else in fsm.alphabet and any(c not in named for c in vocab.chars):
            producible.add(fsm.alphabet[anything_else])
        table = np.full((dead + 1, symbols + 1), dead, dtype=np.int32)  # column `symbols`: a char it never takes
        for state, moves in fsm.map.items():
            for symbol, target in moves.items():
                if symbol in producible:
                    table[index[state], symbol] = index[target]
        finals = {index[s] for s in fsm.finals}
        live = _live_states(table, finals, dead)
        table[~np.isin(table, list(live))] = dead  # nothing leads where the pattern cannot be completed
        initial = index[fsm.initial]
        if initial not in live:
            missing = sorted(ch for ch in named if ch not in vocab.chars)
            raise ValueError(f"structured_outputs: no output the tokenizer can produce matches the constraint "
                             f"(characters no token holds whole: {missing[:10]!r})")
        other = fsm.alphabet[anything_else] if anything_else in fsm.alphabet else symbols
        lut = np.full(vocab.max_code + 1, other, dtype=np.int64)
        for ch, symbol in named.items():
            if ord(ch) <= vocab.max_code:
                lut[ord(ch)] = symbol
        self.table, self.dead, self.vocab = table, dead, vocab
        self.buckets = [(ids, lut[codes]) for ids, codes in vocab.buckets]
        self.initial, self.finals = initial, finals
        self.stop_ids = sorted(i for i in stop_ids if 0 <= i < vocab.size)
        # per state: (allowed [V] bool, next state [V] int32), ~5 bytes a token: least recently used first out
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._masks: OrderedDict[tuple[int, str], torch.Tensor] = OrderedDict()

    max_cached_states = 256  # ~160 MB of host arrays (and 32 MB of device masks) at a 128k vocabulary

    def _walk(self, state: int) -> tuple[np.ndarray, np.ndarray]:
        entry = self._cache.get(state)
        if entry is not None:
            self._cache.move_to_end(state)
        else:
            nxt = np.full(self.vocab.size, self.dead, dtype=np.int32)
            for ids, syms in self.buckets:
                cur = np.full(len(ids), state, dtype=np.int32)
                for pos in range(syms.shape[1]):
                    cur = self.table[cur, syms[:, pos]]
                nxt[ids] = cur
            allowed = nxt != self.dead
            if state in self.finals:
                allowed[self.stop_ids] = True
            entry = self._cache[state] = (allowed, nxt)
            while len(self._cache) > self.max_cached_states:
                self._cache.popitem(last=False)
        return entry

    def next_state(self, state: int, token: int) -> int:
        nxt = int(self._walk(state)[1][token])
        return state if nxt == self.dead else nxt  # a stop token leaves the state as it is

    def mask(self, state: int, device: torch.device) -> torch.Tensor:
        """bool [vocab]: the tokens allowed from `state`, on `device` (cached)."""
        key = (state, str(device))
        m = self._masks.get(key)
        if m is not None:
            self._masks.move_to_end(key)
        else:
            m = self._masks[key] = torch.from_numpy(self._walk(state)[0]).to(device)
            while len(self._masks) > self.max_cached_states:
                self._masks.popitem(last=False)
        return m

    def can_continue(self, state: int) -> bool:
        return bool(self._walk(state)[0].any())

    def accepts(self, state: int) -> bool:
        return state in self.finals


def _live_states(table: np.ndarray, finals: set[int], dead: int) -> set[int]:
    """The states from which a final state is reachable."""
    preds: dict[int, set[int]] = {}
    for state in range(dead):
        for target in set(table[state].tolist()) - {dead}:
            preds.setdefault(target, set()).add(state)
    live, frontier = set(finals), list(finals)
    while frontier:
        for p in preds.get(frontier.pop(), ()):
            if p not in live:
                live.add(p)
                frontier.append(p)
    return live
