"""When a sequence stops (engine.py's _append_token): EOS, stop token ids, stop strings, max_tokens and
the context length, and the text it ends with.

Functions of the values they check (the engine passes its current ones): nothing here holds state.
They detokenize and cut seq.text; finishing the sequence in the scheduler is the engine's."""
from __future__ import annotations

from .detokenize import detokenize
from .sampling_params import SamplingParams
from .sequence import Sequence


def ngram_bans(tokens: list[int], n: int) -> list[int]:
    """HF's NoRepeatNGramLogitsProcessor for one row: the tokens that follow an earlier occurrence of the
    row's last n - 1 tokens (with n = 1, every token seen), i.e. that would make an n-gram occur twice."""
    if n < 1 or len(tokens) + 1 < n:
        return []
    prefix = tokens[len(tokens) - (n - 1):] if n > 1 else []
    return [tokens[i + n - 1] for i in range(len(tokens) - n + 1) if tokens[i:i + n - 1] == prefix]


def bad_word_bans(tokens: list[int], bad_words: list[list[int]] | None) -> list[int]:
    """HF's NoBadWordsLogitsProcessor for one row: the last token of each bad word whose other tokens end
    the row (a one-token bad word: always)."""
    return [w[-1] for w in bad_words or () if len(w) == 1 or (len(w) - 1 <= len(tokens) and tokens[len(tokens) - len(w) + 1:] == w[:-1])]


def history_bans(seq: Sequence) -> list[int]:
    """The tokens seq's next one may not be by what it holds so far: HF's no_repeat_ngram_size and
    bad_words_ids over its (HF-padded) prompt + output, vLLM's bad_words over its output alone."""
    p, bans = seq.params, []
    if p.no_repeat_ngram_size or p.bad_words_ids:
        history = (seq.ngram_history if seq.ngram_history is not None else seq.prompt_token_ids) + seq.output_token_ids
        bans = ngram_bans(history, p.no_repeat_ngram_size) + bad_word_bans(history, p.bad_words_ids)
    if p._bad_words_token_ids:
        bans += bad_word_bans(seq.output_token_ids, p._bad_words_token_ids)
    return bans


def stop_ids(params: SamplingParams, eos_ids: set[int]) -> set[int]:
    """The token ids that end a sequence with these params (suppressed while below min_tokens)."""
    ids = set(params.stop_token_ids or ())
    return ids if params.ignore_eos else ids | eos_ids


def check_stop(seq: Sequence, tok: int, *, eos_ids: set[int], tokenizer,
               max_model_len: int) -> tuple[str, int | str | None] | None:
    """seq's (finish_reason, stop_reason) when `tok`, just appended to its output, ends it, else None.
    Detokenizes the new token first (with a tokenizer and params.detokenize) to match stop strings."""
    p = seq.params
    searched = len(seq.text)
    if tokenizer is not None and p.detokenize:
        detokenize(tokenizer, seq)
    if len(seq.output_token_ids) > p.min_tokens - 1:
        if not p.ignore_eos and tok in eos_ids:
            return final_reason(seq, "stop", None, tokenizer)
        if tok in (p.stop_token_ids or ()):
            return final_reason(seq, "stop", tok, tokenizer)
        stop = cut_at_stop(seq, searched)
        if stop is not None:
            return final_reason(seq, "stop", stop, tokenizer)
    if len(seq.output_token_ids) >= p.max_tokens or len(seq) >= max_model_len:
        return final_reason(seq, "length", None, tokenizer)
    return None


def final_reason(seq: Sequence, reason: str, stop_reason: int | str | None,
                 tokenizer) -> tuple[str, int | str | None]:
    """The (finish_reason, stop_reason) seq finishes with, after the text's last characters are flushed."""
    if (tokenizer is not None and seq.params.detokenize
            and not isinstance(stop_reason, str)):  # a stop string cut the text already
        searched = len(seq.text)
        detokenize(tokenizer, seq, final=True)  # characters held back for an incomplete UTF-8 tail
        if len(seq.output_token_ids) >= seq.params.min_tokens:  # ... may complete a stop string
            stop = cut_at_stop(seq, searched)
            if stop is not None:
                reason, stop_reason = "stop", stop
    return reason, stop_reason


def cut_at_stop(seq: Sequence, searched: int) -> str | None:
    """The first of seq's stop strings in its text past `searched` characters (only text that can hold a
    new match): the text is cut there and the string returned; None when there is none."""
    for stop in seq.params.stop or ():
        at = seq.text.find(stop, max(0, searched - len(stop) + 1))
        if at >= 0:
            seq.text = seq.text[:at + len(stop) if seq.params.include_stop_str_in_output else at]
            return stop
    return None
