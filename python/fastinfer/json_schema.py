"""JSON schema -> regular expression for structured outputs (structured.py): the regex's matches are
the JSON texts valid under the schema, for the subset StructuredOutputsParams documents; any other
keyword raises a ValueError naming it."""
from __future__ import annotations

import json
import re
from typing import Any

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


JSON_OBJECT_DEPTH = 3  # json_object: objects / arrays nest at most this deep (the outer object counts)


def json_object_regex(whitespace: str = DEFAULT_WHITESPACE, depth: int = JSON_OBJECT_DEPTH) -> str:
    """vLLM's json_object as a regular expression: any JSON object whose objects and arrays nest at most
    `depth` levels (a regular language needs a bound; 3 gives a character automaton of ~1.9k states built
    in a few seconds, 4 one of ~7.5k in a minute). Scalars: strings, numbers, true, false, null."""
    string = f'"{_STRING_CHAR}*"'
    value = f"(?:{string}|{_NUMBER}|true|false|null)"
    ws = whitespace
    for level in range(1, depth + 1):
        obj = rf"\{{{ws}(?:{string}{ws}:{ws}{value}(?:{ws},{ws}{string}{ws}:{ws}{value})*)?{ws}\}}"
        if level == depth:
            return obj
        arr = rf"\[{ws}(?:{value}(?:{ws},{ws}{value})*)?{ws}\]"
        value = f"(?:{string}|{_NUMBER}|true|false|null|{obj}|{arr})"
    raise ValueError(f"json_object depth must be >= 1, got {depth}")


def strip_anchors(pattern: str) -> str:
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
            inner = strip_anchors(s["pattern"])
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
