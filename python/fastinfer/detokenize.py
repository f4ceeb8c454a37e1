"""Incremental detokenization of a sequence's output (the engine calls it once per new token)."""
from __future__ import annotations

from .sequence import Sequence


def detokenize(tokenizer, seq: Sequence, final: bool = False) -> None:
    """Append the text of seq's new output tokens to seq.text, decoding a window that starts a few
    tokens back (prefix_offset): the text a token adds depends on its neighbours (byte-level BPE
    pieces of one character, SentencePiece's leading space), and a window ending in an incomplete
    UTF-8 character (U+FFFD) waits for the next token, unless `final` (the sequence has finished:
    the text ends as the whole output's decode does). O(window) per token, not O(length).
    The text is tokenizer.decode(output, clean_up_tokenization_spaces=False): that clean-up (" 's"
    -> "'s", " ." -> ".") can delete characters on either side of a window's edge, so a windowed
    decode with it on would lose characters that the full decode keeps."""
    ids, skip = seq.output_token_ids, seq.params.skip_special_tokens
    prefix = tokenizer.decode(ids[seq.prefix_offset:seq.read_offset], skip_special_tokens=skip,
                              clean_up_tokenization_spaces=False)
    full = tokenizer.decode(ids[seq.prefix_offset:], skip_special_tokens=skip, clean_up_tokenization_spaces=False)
    if len(full) > len(prefix) and (final or not full.endswith("\ufffd")):
        seq.text += full[len(prefix):]
        seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
