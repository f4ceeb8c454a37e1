"""A `transformers.PreTrainedTokenizerFast` rebuilt from a GGUF file's tokenizer metadata.

llama.cpp's converter stores the vocabulary (`tokenizer.ggml.tokens`, byte-level spelling), the
merges, a type per token (3 = control, 4 = user defined), special token ids, add_bos/add_eos and the
chat template; the pre-tokenizer is only a name (`tokenizer.ggml.pre`) that llama.cpp maps to split
regexes in `llama-vocab.cpp`. We map that name to the same splits in `tokenizers`.

Built directly with `tokenizers` rather than transformers' GGUF converter, whose module moved and
changed signature between 4.x and 5.x, and which ignores the "smollm" pre-tokenizer (digits split
one by one). Two vocabularies are supported: byte-level BPE (`tokenizer.ggml.model == "gpt2"`) and
SentencePiece BPE (`"llama"`: Llama 2, Mistral, Mixtral, Phi-3), whose file holds pieces, scores and
types but no merges. llama.cpp tokenizes the latter as SentencePiece does: a space before the text
(`tokenizer.ggml.add_space_prefix`, default on) and after every special token, spaces as U+2581, then
repeatedly the adjacent pair whose merged piece is in the vocabulary with the highest score; a
character outside it falls back to its UTF-8 bytes (<0xNN> pieces). A BPE whose merges are ranked by
that score, with byte fallback, does the same.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED = 3, 4
_TOKEN_TYPE_NORMAL = 1  # the only SentencePiece pieces a merge produces or consumes (not unknown / byte / unused)
_SPACE = "\u2581"
# llama.cpp's special token ids of a SentencePiece vocabulary when the file gives none
SPM_SPECIAL_DEFAULTS = {"tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
                        "tokenizer.ggml.unknown_token_id": 0}
# llama.cpp's regexes for the pre-tokenizer names it writes (llama-vocab.cpp); GPT-2's own regex is
# what `ByteLevel(use_regex=True)` applies.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


def _byte_level(split: str | None = None, digits: bool = False) -> pre_tokenizers.PreTokenizer:
    steps = []
    if digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    if split is not None:
        steps.append(pre_tokenizers.Split(Regex(split), behavior="isolated"))
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split is None))
    return pre_tokenizers.Sequence(steps) if len(steps) > 1 else steps[0]


# name -> (pre-tokenizer, ignore_merges: a pre-token that is itself in the vocabulary stays whole,
# as llama.cpp does for Llama 3)
_PRE_TOKENIZERS = {
    "default": (lambda: _byte_level(), False),
    "gpt2": (lambda: _byte_level(), False),
    "smollm": (lambda: _byte_level(digits=True), False),
    "starcoder": (lambda: _byte_level(digits=True), False),
    "refact": (lambda: _byte_level(digits=True), False),  # Granite's; llama.cpp splits it as starcoder
    "llama-bpe": (lambda: _byte_level(_LLAMA3_SPLIT), True),
    "llama3": (lambda: _byte_level(_LLAMA3_SPLIT), True),
    "qwen2": (lambda: _byte_level(_QWEN2_SPLIT), False),
}


def build_tokenizer(metadata: dict[str, Any], path: Path):
    """A PreTrainedTokenizerFast equivalent to the one the GGUF was converted from."""
    from transformers import PreTrainedTokenizerFast

    kind = metadata.get("tokenizer.ggml.model")
    if kind not in ("gpt2", "llama"):
        raise ValueError(f"{path}: tokenizer model {kind!r} is not supported; byte-level BPE ('gpt2') and "
                         f"SentencePiece BPE ('llama') are")
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not _is_str_list(tokens):
        raise ValueError(f"{path}: tokenizer.ggml.tokens must be a list of strings")
    vocab = {token: index for index, token in enumerate(tokens)}
    if kind == "llama":  # llama.cpp's special ids for SentencePiece vocabularies where the file names none
        metadata = {**SPM_SPECIAL_DEFAULTS, **metadata}
    backend = _byte_level_bpe(metadata, path, vocab) if kind == "gpt2" else _sentencepiece_bpe(metadata, path, vocab)
    # llama.cpp strips the whitespace after Phi-3's special tokens (it goes by general.name: nothing else says so)
    name = str(metadata.get("general.name", "")).lower()
    rstrip = kind == "llama" and ("phi-3" in name or "phi3" in name)
    _add_special_tokens(backend, tokens, metadata.get("tokenizer.ggml.token_type") or [], rstrip)

    special = {name: _token(metadata, tokens, f"tokenizer.ggml.{key}_token_id", path)
               for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding"))}
    # llama.cpp's defaults: SentencePiece vocabularies add BOS unless the file says otherwise
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
    backend.post_processor = _post_processor(special["bos"] if add_bos else None,
                                             special["eos"] if add_eos else None, vocab)
    chat_template = metadata.get("tokenizer.chat_template")
    if chat_template is not None and not isinstance(chat_template, str):
        raise ValueError(f"{path}: tokenizer.chat_template must be a string, got {type(chat_template).__name__}")
    context_length = metadata.get(f"{metadata.get('general.architecture')}.context_length")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        **{f"{name}_token": token for name, token in special.items() if token is not None},
        chat_template=chat_template,
        clean_up_tokenization_spaces=False,
        model_max_length=int(context_length) if context_length else int(1e30),
    )


def _byte_level_bpe(metadata: dict[str, Any], path: Path, vocab: dict[str, int]) -> Tokenizer:
    pre = metadata.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise ValueError(f"{path}: pre-tokenizer {pre!r} is not supported; supported: {sorted(_PRE_TOKENIZERS)}")
    merges = metadata.get("tokenizer.ggml.merges")
    if not _is_str_list(merges):
        raise ValueError(f"{path}: tokenizer.ggml.merges must be a list of strings")
    pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    bad = [m for m, pair in zip(merges, pairs) if len(pair) != 2 or not all(p in vocab for p in (*pair, "".join(pair)))]
    if bad:  # `tokenizers` would panic (a BaseException) on these
        raise ValueError(f"{path}: {len(bad)} merge(s) use tokens outside the vocabulary, e.g. {bad[:3]}")
    make_pre_tokenizer, ignore_merges = _PRE_TOKENIZERS[pre]
    backend = Tokenizer(models.BPE(vocab, pairs, ignore_merges=ignore_merges))
    backend.pre_tokenizer = make_pre_tokenizer()
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(metadata: dict[str, Any], path: Path, vocab: dict[str, int]) -> Tokenizer:
    """SentencePiece BPE as llama.cpp runs it (module docstring): merges ranked by the merged piece's score."""
    tokens, scores = metadata["tokenizer.ggml.tokens"], metadata.get("tokenizer.ggml.scores")
    types = metadata.get("tokenizer.ggml.token_type")
    for key, value in (("scores", scores), ("token_type", types)):
        if not isinstance(value, list) or len(value) != len(tokens) or \
                not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise ValueError(f"{path}: tokenizer.ggml.{key} must be a list of {len(tokens)} numbers (one per token)")
    if len(vocab) != len(tokens):
        raise ValueError(f"{path}: tokenizer.ggml.tokens lists a piece twice")
    normal = {t for t, kind in zip(tokens, types) if kind == _TOKEN_TYPE_NORMAL}
    # (-score of the merged piece, its id, left id): best first, equal scores by id. llama.cpp breaks equal scores
    # by position instead, which no merge ranking can do; equal scores come from vocabularies its converter took
    # from a tokenizer.json (placeholder scores of -1000), whose ids follow the BPE's own merge order: ranking by
    # id keeps that tokenizer's merges, which is what the model was trained with.
    ranked = []
    for piece in normal:
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-scores[vocab[piece]], vocab[piece], vocab[left], left, right))
    ranked.sort()
    unk = metadata.get("tokenizer.ggml.unknown_token_id")
    unk_token = tokens[unk] if isinstance(unk, int) and 0 <= unk < len(tokens) else None
    backend = Tokenizer(models.BPE(vocab, [(left, right) for *_, left, right in ranked], unk_token=unk_token,
                                   byte_fallback=True, fuse_unk=True))
    prefix = metadata.get("tokenizer.ggml.add_space_prefix", True)
    steps = [normalizers.Prepend(_SPACE)] if prefix else []
    backend.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", _SPACE)])
    steps = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return backend


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _add_special_tokens(backend: Tokenizer, tokens: list[str], token_types: list[int], rstrip: bool = False) -> None:
    """Control tokens (<|im_start|>) become special, user-defined ones plain added tokens: both are
    matched whole in the text, as llama.cpp does, instead of being cut into byte pieces. rstrip (Phi-3):
    each also swallows the whitespace after it, except <unk>, <s> and <|endoftext|> (llama-vocab.cpp)."""
    typed = list(zip(tokens, token_types))

    def added(token: str, special: bool) -> AddedToken:
        return AddedToken(token, special=special, normalized=False,
                          rstrip=rstrip and token not in ("<unk>", "<s>", "<|endoftext|>"))
    backend.add_special_tokens([added(t, True) for t, kind in typed if kind == _TOKEN_TYPE_CONTROL])
    backend.add_tokens([added(t, False) for t, kind in typed if kind == _TOKEN_TYPE_USER_DEFINED])


def _token(metadata: dict[str, Any], tokens: list[str], key: str, path: Path) -> str | None:
    index = metadata.get(key)
    if index is None:
        return None
    if not isinstance(index, int) or not 0 <= index < len(tokens):
        raise ValueError(f"{path}: {key} = {index} is outside the vocabulary of {len(tokens)} tokens")
    return tokens[index]


def _post_processor(bos: str | None, eos: str | None, vocab: dict[str, int]):
    """BOS/EOS added around every sequence only when the GGUF asks for it (SmolLM2 does not)."""
    if bos is None and eos is None:
        return None
    prefix, suffix = ([bos] if bos else []), ([eos] if eos else [])
    single = " ".join(prefix + ["$A"] + suffix)
    pair = " ".join(prefix + ["$A"] + suffix + prefix + ["$B"] + suffix)
    return processors.TemplateProcessing(single=single, pair=pair,
                                         special_tokens=list({t: vocab[t] for t in prefix + suffix}.items()))
