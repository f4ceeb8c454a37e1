"""HF's ``stop_strings`` for ``fastinfer.generate`` (transformers' StopStringCriteria, its semantics).

A row stops at the token that completes a stop string: the string occurs in the concatenation of the
row's token texts (the whole padded row, prompt included) and overlaps that last token (which may hold
all of it, or run past its end: what transformers 5's StopStringCriteria returns, checked against it).
As in HF, a finished row is padded only when there are EOS ids (HF pads only then); without them it
goes on generating until every row has finished. Token texts are HF's "clean" ones: a byte-level vocabulary's tokens as their
bytes (stop strings as UTF-8), byte-fallback pieces (<0xNN>) as their byte, any other token as the text
it adds after the tokens of a static prefix. The tokens stay in the output (HF does not cut the text),
unlike the batch API's vLLM stop strings.
"""
from __future__ import annotations

import json

_STATIC_PREFIX = "abcdef"


def _decoder_types(config) -> set[str]:
    types: set[str] = set()
    if isinstance(config, dict):
        if isinstance(config.get("type"), str):
            types.add(config["type"])
        for value in config.values():
            types |= _decoder_types(value)
    elif isinstance(config, list):
        for value in config:
            types |= _decoder_types(value)
    return types


def _matching_mode(tokenizer) -> str | None:
    """"byte_level", "byte_fallback" or None (plain text), from the tokenizer's decoder, as HF decides."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if decoder is None:
        return None
    if decoder.__class__.__name__ == "ByteLevel":
        return "byte_level"
    state = getattr(decoder, "__getstate__", lambda: None)()
    try:
        config = json.loads(state.decode() if isinstance(state, bytes) else state) if state else None
    except (json.JSONDecodeError, TypeError, UnicodeDecodeError):
        config = None
    types = _decoder_types(config)
    if "ByteFallback" in types:
        return "byte_fallback"
    if "ByteLevel" in types:
        return "byte_level"
    return None


def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable spelling of the 256 bytes, inverted (HF's table: stop strings need an HF tokenizer,
    so transformers is installed)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    return {ch: b for b, ch in bytes_to_unicode().items()}


class StopStrings:
    """HF's stop_strings over one tokenizer: `hit(row)` is whether the row's last token completes one."""

    def __init__(self, tokenizer, stop_strings: list[str]):
        self.tokenizer = tokenizer
        self.mode = _matching_mode(tokenizer)
        self.stops = [s.encode("utf-8") for s in stop_strings] if self.mode else list(stop_strings)
        self.longest = max(len(s) for s in self.stops)
        self.byte_decoder = _byte_decoder() if self.mode == "byte_level" else None
        base = tokenizer(_STATIC_PREFIX, add_special_tokens=False)["input_ids"]
        self.base_tokens = tokenizer.convert_ids_to_tokens(base)
        if _STATIC_PREFIX not in tokenizer.convert_tokens_to_string(self.base_tokens):
            # HF's StopStringCriteria fails here too (its "substring not found")
            raise ValueError(f"stop_strings: this tokenizer does not round-trip the text {_STATIC_PREFIX!r}, which "
                             f"HF's stop-string matching needs to find each token's text")
        self._texts: dict[int, str | bytes | None] = {}
        self.vocab_size = len(tokenizer)
        if self.mode is None:  # a byte-level or byte-fallback vocabulary can end any string; others are checked
            self._check_endable()

    def _check_endable(self) -> None:
        """As HF, refuse stop strings no token can end (a token overlapping the string's last character)."""
        texts = [t for t in (self.text(i) for i in range(self.vocab_size)) if t]
        for stop in self.stops:
            if not any(_can_end(t, stop) for t in texts):
                raise ValueError(f"stop_strings: no token of this tokenizer can end {stop!r} (HF refuses it too: "
                                 f"it could never match)")

    def text(self, token_id: int) -> str | bytes | None:
        """The token's clean text; None for an id the tokenizer does not have (a model vocabulary padded
        past the tokenizer's): HF gives those a row that never matches, and a match never crosses them."""
        if token_id in self._texts:
            return self._texts[token_id]
        token = self.tokenizer.convert_ids_to_tokens(token_id) if 0 <= token_id < self.vocab_size else None
        text = None
        if token is not None:
            text = self._as_bytes(token) if self.mode else None
            if text is None:
                full = self.tokenizer.convert_tokens_to_string(self.base_tokens + [token])
                at = full.find(_STATIC_PREFIX)
                if at < 0:
                    raise ValueError(f"stop_strings: this tokenizer does not decode token {token!r} after the text "
                                     f"{_STATIC_PREFIX!r} (HF's stop-string matching fails on it too)")
                text = full[at + len(_STATIC_PREFIX):]
                text = text.encode("utf-8") if self.mode else text
        self._texts[token_id] = text
        return text

    def _as_bytes(self, token: str) -> bytes | None:
        if self.mode == "byte_level":
            if all(ch in self.byte_decoder for ch in token):
                return bytes(self.byte_decoder[ch] for ch in token)
            return None
        if len(token) == 6 and token.startswith("<0x") and token.endswith(">") and all(
                ch in "0123456789abcdefABCDEF" for ch in token[3:5]):
            return bytes([int(token[3:5], 16)])
        return None

    def hit(self, row: list[int]) -> bool:
        """Whether a stop string occurs in the row's text overlapping its last token."""
        if not row or self.text(row[-1]) is None:
            return False
        parts = [self.text(row[-1])]
        need = self.longest - 1 + len(parts[0])
        have = len(parts[0])
        i = len(row) - 2
        while have < need and i >= 0:  # the window: the last token and longest - 1 units before it
            text = self.text(row[i])
            if text is None:  # an unknown id: nothing matches across it
                break
            parts.append(text)
            have += len(text)
            i -= 1
        tail = parts[0][:0].join(reversed(parts))
        last = len(parts[0])  # each string's window: the last token and len(string) - 1 units before it
        return any(stop in tail[max(0, len(tail) - last - len(stop) + 1):] for stop in self.stops)


def _can_end(token, stop) -> bool:
    """Whether `token` can be the last token of a match of `stop`: placed at some offset, it covers the
    string's last character and agrees with it where they overlap."""
    for offset in range(1 - len(token), len(stop)):  # the token's start relative to the string's
        if offset + len(token) < len(stop):
            continue
        lo = max(0, offset)
        if stop[lo:] == token[lo - offset:lo - offset + len(stop) - lo]:
            return True
    return False
