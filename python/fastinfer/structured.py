"""Structured outputs (vLLM's ``StructuredOutputsParams``): generation constrained to a regular
expression, to one of a list of strings, or to a JSON schema.

Every constraint becomes a regular expression (a JSON schema through ``json_schema_regex``), the
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
from typing import Any

import numpy as np
import torch

DEFAULT_WHITESPACE = r"[ ]?"  # between JSON tokens: at most one space (a model cannot ramble in whitespace)

_STRING_CHAR = r'(?:[^"\\\x00-\x1f\x7f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})'
_INTEGER = r"-?(?:0|[1-9][0-9]*)"
_NUMBER = _INTEGER + r"(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?"
_FORMATS = {
    "date": r"[0-9]{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01])",
    "time": r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]+)?(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])?",
    "uuid": r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
}
_FORMATS["date-time"] = _FORMATS["date"] + "T" + _FORMATS["time"]
# keywords that only annotate a schema
_ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
                "readOnly", "writeOnly"}
_MAX_REF_DEPTH = 16
# each type's keywords (a type list passes each member its own)
_TYPE_KEYWORDS = {"string": {"minLength", "maxLength", "pattern", "format"}, "array": {"items", "minItems", "maxItems"},
                  "object": {"properties", "required", "additionalProperties"}}


@dataclass
class StructuredOutputsParams:
    """What a request's output must look like; exactly one of json, regex, choice (vLLM's fields).

    json: a JSON schema (dict or JSON text): objects (properties, required, additionalProperties
    false), arrays (items, minItems, maxItems), strings (minLength, maxLength, pattern, format date /
    time / date-time / uuid), integers, numbers, booleans, null, enum, const, anyOf / oneOf, local $ref.
    regex: Python regular-expression syntax, matched in full. choice: the output is one of these strings.
    whitespace_pattern: the regex allowed between JSON tokens (default: at most one space).
    grammar and json_object are vLLM fields fastinfer does not implement: setting them is an error."""
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
        if self.json_object is not None:
            raise ValueError("structured_outputs: json_object is not supported by fastinfer (give a JSON schema as "
                             "json=...)")
        given = [name for name in ("json", "regex", "choice") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"structured_outputs needs exactly one of json, regex, choice; got "
                             f"{', '.join(given) or 'none'}")
        ws = DEFAULT_WHITESPACE if self.whitespace_pattern is None else self.whitespace_pattern
        if not isinstance(ws, str):
            raise ValueError(f"structured_outputs: whitespace_pattern must be a str, got {ws!r}")
        if self.json is not None:
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
            self._pattern = _strip_anchors(self.regex)  # the whole output matches anyway
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


def _strip_anchors(pattern: str) -> str:
    """pattern without a leading ^ and an unescaped trailing $ (matches are whole outputs / whole JSON
    strings anyway; the automaton library does not take anchors)."""
    if pattern.startswith("^"):
        pattern = pattern[1:]
    if pattern.endswith("$"):
        backslashes = len(pattern[:-1]) - len(pattern[:-1].rstrip("\\"))
        if backslashes % 2 == 0:
            pattern = pattern[:-1]
    return pattern


def _check_json_string_pattern(pattern: str) -> None:
    """A string schema's pattern may only produce characters a JSON string holds unescaped."""
    try:
        import interegular
        fsm = interegular.parse_pattern(pattern).to_fsm()
        plain = interegular.parse_pattern(r'[^"\\\x00-\x1f]*').to_fsm()
        outside = not (fsm - plain).empty()
    except ImportError:
        return  # checked again when the automaton is built (which needs interegular)
    except Exception as e:
        raise ValueError(f"structured_outputs: string pattern {pattern!r} cannot be compiled: {e}") from None
    if outside:
        raise ValueError(f"structured_outputs: string pattern {pattern!r} can produce a quote, a backslash or a "
                         f"control character, which a JSON string must escape; not supported")


# ---- JSON schema -> regular expression ---------------------------------------------------------------

def json_schema_regex(schema: dict, whitespace: str = DEFAULT_WHITESPACE) -> str:
    """A regular expression whose matches are the JSON texts valid under `schema` (the subset
    StructuredOutputsParams lists; anything else raises ValueError naming the keyword)."""
    return _Schema(schema, whitespace).regex(schema, 0)


class _Schema:
    def __init__(self, root: dict, ws: str):
        self.root, self.ws = root, f"(?:{ws})" if ws else ""

    def regex(self, s: Any, depth: int) -> str:
        if not isinstance(s, dict):
            raise ValueError(f"structured_outputs: a JSON schema must be an object, got {s!r:.80}")
        s = {k: v for k, v in s.items() if k not in _ANNOTATIONS and k not in ("$defs", "definitions")}
        if "$ref" in s:
            if len(s) > 1:
                raise ValueError(f"structured_outputs: $ref next to other keywords ({sorted(set(s) - {'$ref'})}) "
                                 f"is not supported")
            if depth >= _MAX_REF_DEPTH:
                raise ValueError("structured_outputs: the schema's $ref nesting is too deep (a recursive schema is "
                                 "not supported)")
            return self.regex(self._resolve(s["$ref"]), depth + 1)
        if "enum" in s:
            self._only(s, {"enum", "type"})
            if not isinstance(s["enum"], list) or not s["enum"]:
                raise ValueError("structured_outputs: enum must be a non-empty list")
            return "(?:" + "|".join(re.escape(json.dumps(v)) for v in s["enum"]) + ")"
        if "const" in s:
            self._only(s, {"const", "type"})
            return re.escape(json.dumps(s["const"]))
        for key in ("anyOf", "oneOf"):
            if key in s:
                self._only(s, {key})
                if not isinstance(s[key], list) or not s[key]:
                    raise ValueError(f"structured_outputs: {key} must be a non-empty list")
                return "(?:" + "|".join(self.regex(sub, depth) for sub in s[key]) + ")"
        if "allOf" in s:
            self._only(s, {"allOf"})
            if not isinstance(s["allOf"], list) or len(s["allOf"]) != 1:
                raise ValueError("structured_outputs: allOf is supported with exactly one schema")
            return self.regex(s["allOf"][0], depth)
        kind = s.get("type")
        if kind is None:
            raise ValueError(f"structured_outputs: a schema without a type (keywords {sorted(s)}) is not supported")
        if isinstance(kind, list):
            if not kind:
                raise ValueError("structured_outputs: type must not be an empty list")
            unknown = set(s) - {"type"} - set().union(*_TYPE_KEYWORDS.values())
            if unknown:
                raise ValueError(f"structured_outputs: JSON schema keyword(s) {sorted(unknown)} not supported here")
            return "(?:" + "|".join(self.regex({key: v for key, v in s.items() if key in _TYPE_KEYWORDS.get(k, ())}
                                               | {"type": k}, depth) for k in kind) + ")"
        method = {"object": self._object, "array": self._array, "string": self._string}.get(kind)
        if method is not None:
            return method(s, depth)
        simple = {"integer": _INTEGER, "number": _NUMBER, "boolean": "(?:true|false)", "null": "null"}
        if kind not in simple:
            raise ValueError(f"structured_outputs: type {kind!r} is not supported")
        self._only(s, {"type"})
        return simple[kind]

    def _resolve(self, ref: str) -> dict:
        for prefix in ("#/$defs/", "#/definitions/"):
            if isinstance(ref, str) and ref.startswith(prefix):
                target = self.root.get(prefix[2:-1], {}).get(ref[len(prefix):])
                if isinstance(target, dict):
                    return target
        raise ValueError(f"structured_outputs: $ref {ref!r} is not supported (only local #/$defs/... references)")

    @staticmethod
    def _only(s: dict, allowed: set) -> None:
        extra = sorted(set(s) - allowed)
        if extra:
            raise ValueError(f"structured_outputs: JSON schema keyword(s) {extra} not supported here "
                             f"(type {s.get('type')!r})")

    def _string(self, s: dict, depth: int) -> str:
        self._only(s, {"type", "minLength", "maxLength", "pattern", "format"})
        if "pattern" in s:
            if len(s) > 2:
                raise ValueError("structured_outputs: a string pattern with other string keywords is not supported")
            inner = _strip_anchors(s["pattern"])
            _check_json_string_pattern(inner)
            return f'"(?:{inner})"'
        if "format" in s:
            if s["format"] not in _FORMATS or len(s) > 2:
                raise ValueError(f"structured_outputs: string format {s['format']!r} is not supported (supported: "
                                 f"{', '.join(_FORMATS)}, alone)")
            return '"' + _FORMATS[s["format"]] + '"'
        low, high = s.get("minLength", 0), s.get("maxLength")
        if not _count(low) or (high is not None and (not _count(high) or high < low)):
            raise ValueError(f"structured_outputs: minLength / maxLength must be integers >= 0, min <= max, got "
                             f"{low!r}, {high!r}")
        if low == 0 and high is None:
            return f'"{_STRING_CHAR}*"'
        return f'"{_STRING_CHAR}{{{low},{"" if high is None else high}}}"'

    def _array(self, s: dict, depth: int) -> str:
        self._only(s, {"type", "items", "minItems", "maxItems"})
        if not isinstance(s.get("items"), dict):
            raise ValueError("structured_outputs: an array schema needs an items schema")
        item, ws = self.regex(s["items"], depth), self.ws
        low, high = s.get("minItems", 0), s.get("maxItems")
        if not _count(low) or (high is not None and (not _count(high) or high < low)):
            raise ValueError(f"structured_outputs: minItems / maxItems must be integers >= 0, min <= max, got "
                             f"{low!r}, {high!r}")
        more = f"(?:{ws},{ws}{item})"
        if high == 0:
            return rf"\[{ws}\]"
        rest = f"{more}{{{max(low - 1, 0)},{'' if high is None else high - 1}}}"
        body = f"{item}{rest}"
        return rf"\[{ws}{body}{ws}\]" if low > 0 else rf"\[{ws}(?:{body})?{ws}\]"

    def _object(self, s: dict, depth: int) -> str:
        self._only(s, {"type", "properties", "required", "additionalProperties"})
        props = s.get("properties", {})
        required = s.get("required", [])
        if not isinstance(props, dict) or not isinstance(required, list) or not set(required) <= set(props):
            raise ValueError("structured_outputs: an object schema needs properties (an object) and required (a list "
                             "of its property names)")
        if s.get("additionalProperties", False) is not False:  # absent: only the listed properties are generated
            raise ValueError("structured_outputs: additionalProperties other than false is not supported")
        ws = self.ws
        items = [(f"{re.escape(json.dumps(name))}{ws}:{ws}{self.regex(sub, depth)}", name in required)
                 for name, sub in props.items()]
        if not items:
            return rf"\{{{ws}\}}"
        # the properties in the schema's order, optional ones may be absent: alternatives by the first present
        first_required = next((i for i, (_, req) in enumerate(items) if req), len(items) - 1)
        alternatives = []
        for k in range(first_required + 1):
            rest = "".join(f"{ws},{ws}{p}" if req else f"(?:{ws},{ws}{p})?" for p, req in items[k + 1:])
            alternatives.append(items[k][0] + rest)
        body = "(?:" + "|".join(alternatives) + ")"
        if not any(req for _, req in items):
            body += "?"
        return rf"\{{{ws}{body}{ws}\}}"


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


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
