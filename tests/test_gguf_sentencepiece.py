"""SentencePiece vocabularies in GGUF files (`tokenizer.ggml.model == "llama"`: Llama 2, Mistral, Mixtral, Phi-3)
against sentencepiece itself: a BPE model with byte fallback is trained on Pride and Prejudice, written into the
GGUF metadata as llama.cpp's converter writes it (pieces, scores, types), and the tokenizer fastinfer rebuilds
must give sentencepiece's ids and text back."""
from __future__ import annotations

import random

import pytest

spm = pytest.importorskip("sentencepiece")
gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")
from fastinfer.loader.gguf_tokenizer import build_tokenizer  # noqa: E402

# sentencepiece's piece types -> llama.cpp's token types (1 normal, 2 unknown, 3 control, 5 unused, 6 byte)
EDGE_CASES = ["", " ", "  hi", "hello  world", "\n\nx", "a\tb", "end  ", "Élan, café, naïve", "日本語のテキスト",
              "emoji 🙂 here", "12345 and 6.78", "It is a truth universally acknowledged"]


def train(tmp_path_factory, dummy_prefix: bool):
    from text_data import novel
    try:
        text = novel()[:300_000]
    except Exception as e:  # noqa: BLE001 (no network and no cached copy)
        pytest.skip(f"the test text is not available: {e}")
    folder = tmp_path_factory.mktemp("spm")
    (folder / "text.txt").write_text(text, encoding="utf-8")
    # Llama's trainer settings: BPE, byte fallback, digits split, spaces kept as they are (Gemma's: no dummy prefix)
    spm.SentencePieceTrainer.train(input=str(folder / "text.txt"), model_prefix=str(folder / "m"), vocab_size=1000,
                                   model_type="bpe", byte_fallback=True, split_digits=True,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   add_dummy_prefix=dummy_prefix, allow_whitespace_only_pieces=True, minloglevel=2,
                                   user_defined_symbols=["<|user|>", "<|end|>"])
    processor = spm.SentencePieceProcessor(model_file=str(folder / "m.model"))
    return processor, text


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train(tmp_path_factory, dummy_prefix=True)


def gguf_metadata(processor, **extra) -> dict:
    types = []  # the chat markers as llama.cpp's Phi-3 converter marks added special tokens: control
    for i in range(processor.get_piece_size()):
        types.append(2 if processor.is_unknown(i) else 3 if processor.is_control(i) or
                     processor.id_to_piece(i) in ("<|user|>", "<|end|>") else
                     5 if processor.is_unused(i) else 6 if processor.is_byte(i) else 1)
    return {"general.architecture": "llama", "tokenizer.ggml.model": "llama",
            "tokenizer.ggml.tokens": [processor.id_to_piece(i) for i in range(processor.get_piece_size())],
            "tokenizer.ggml.scores": [processor.get_score(i) for i in range(processor.get_piece_size())],
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": processor.bos_id(),
            "tokenizer.ggml.eos_token_id": processor.eos_id(), "tokenizer.ggml.unknown_token_id": processor.unk_id(),
            **extra}


def samples(text: str, n: int = 300) -> list[str]:
    rng = random.Random(0)
    out = list(EDGE_CASES)
    for _ in range(n):
        start = rng.randrange(len(text) - 400)
        out.append(text[start:start + rng.randrange(1, 400)])
    return out


def test_ids_and_text_equal_sentencepieces(trained, tmp_path):
    processor, text = trained
    tok = build_tokenizer(gguf_metadata(processor), tmp_path / "x.gguf")
    for s in samples(text):
        expected = processor.encode(s)
        assert tok(s, add_special_tokens=False).input_ids == expected, repr(s)
        assert tok(s).input_ids == [processor.bos_id()] + expected, repr(s)  # llama.cpp adds BOS by default
        assert tok.decode(expected) == processor.decode(expected), repr(s)


def test_a_vocabulary_without_the_prefix_space(tmp_path_factory, tmp_path):
    """Gemma's SentencePiece model adds no dummy prefix and llama.cpp's converter writes add_space_prefix = false
    for it: trained that way, ids and text still equal sentencepiece's."""
    processor, text = train(tmp_path_factory, dummy_prefix=False)
    tok = build_tokenizer(gguf_metadata(processor, **{"tokenizer.ggml.add_space_prefix": False}), tmp_path / "x.gguf")
    for s in samples(text, 100):
        expected = processor.encode(s)
        assert tok(s, add_special_tokens=False).input_ids == expected, repr(s)
        assert tok.decode(expected) == processor.decode(expected), repr(s)


def test_bytes_outside_the_vocabulary_fall_back_to_byte_pieces(trained, tmp_path):
    processor, _ = trained
    tok = build_tokenizer(gguf_metadata(processor), tmp_path / "x.gguf")
    ids = tok("🙂", add_special_tokens=False).input_ids
    assert [processor.id_to_piece(i) for i in ids] == ["▁", "<0xF0>", "<0x9F>", "<0x99>", "<0x82>"] or \
        ids == processor.encode("🙂")
    assert tok.decode(ids) == "🙂"


def test_file_flags(trained, tmp_path):
    """add_bos_token false, add_space_prefix false (then no space is prepended, as llama.cpp), and the special
    tokens stay whole in the text, each followed by llama.cpp's prefix space."""
    processor, _ = trained
    meta = gguf_metadata(processor, **{"tokenizer.ggml.add_bos_token": False, "tokenizer.ggml.add_space_prefix": False})
    tok = build_tokenizer(meta, tmp_path / "x.gguf")
    ids = tok("Elizabeth walked").input_ids
    pieces = [processor.id_to_piece(i) for i in ids]
    assert "".join(pieces) == "Elizabeth▁walked" and ids[0] != processor.bos_id()
    assert tok.decode(ids) == "Elizabeth walked"
    tok = build_tokenizer(gguf_metadata(processor), tmp_path / "x.gguf")
    ids = tok("</s>Elizabeth", add_special_tokens=False).input_ids
    assert ids == [processor.eos_id()] + processor.encode("Elizabeth")


def test_phi3_special_tokens_swallow_the_whitespace_after_them(trained, tmp_path):
    """llama.cpp strips the whitespace after Phi-3's special tokens (by general.name); other models keep it."""
    processor, _ = trained
    text = "<|user|>\nHello<|end|>\n"
    user, end = processor.piece_to_id("<|user|>"), processor.piece_to_id("<|end|>")
    phi3 = build_tokenizer(gguf_metadata(processor, **{"general.name": "Phi 3 Mini 4k Instruct".replace(" 3", "-3")}),
                           tmp_path / "x.gguf")
    assert phi3(text, add_special_tokens=False).input_ids == [user] + processor.encode("Hello") + [end]
    other = build_tokenizer(gguf_metadata(processor, **{"general.name": "Llama 2"}), tmp_path / "x.gguf")
    assert other(text, add_special_tokens=False).input_ids == \
        [user] + processor.encode("\nHello") + [end] + processor.encode("\n")


def test_special_ids_default_as_llama_cpp(trained, tmp_path):
    """A SentencePiece file without special ids: BOS 1, EOS 2, UNK 0, as llama.cpp assumes."""
    processor, _ = trained
    meta = gguf_metadata(processor)
    for key in ("bos", "eos", "unknown"):
        del meta[f"tokenizer.ggml.{key}_token_id"]
    tok = build_tokenizer(meta, tmp_path / "x.gguf")
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
    assert tok("Elizabeth").input_ids[0] == 1


@pytest.mark.parametrize("change, match", [
    (lambda m: m.update({"tokenizer.ggml.scores": [0.0]}), "scores must be a list"),
    (lambda m: m.update({"tokenizer.ggml.token_type": None}), "token_type must be a list"),
    (lambda m: m.update({"tokenizer.ggml.model": "bert"}), "'bert' is not supported"),
])
def test_bad_metadata_is_named(trained, tmp_path, change, match):
    processor, _ = trained
    meta = gguf_metadata(processor)
    change(meta)
    with pytest.raises(ValueError, match=match):
        build_tokenizer(meta, tmp_path / "x.gguf")


def test_a_llama_2_style_gguf_end_to_end(trained, tmp_path):
    """A Llama file with this vocabulary: load_model's tokenizer is sentencepiece's, and LLM.generate's greedy
    tokens and text are HF's (the same weights) on the prompt it tokenized."""
    import torch

    import fastinfer
    from fastinfer import LLM, SamplingParams
    from models import make_hf_model
    from test_gguf_archs import write_gguf
    processor, _ = trained
    model = make_hf_model("llama", seed=5, vocab_size=processor.get_piece_size(), bos_token_id=1, eos_token_id=2)
    path = write_gguf(model, tmp_path / "l2.gguf", tokenizer=gguf_metadata(processor))
    prompt = "It is a truth universally acknowledged"
    ids = [processor.bos_id()] + processor.encode(prompt)
    assert fastinfer.load_model(path).tokenizer(prompt).input_ids == ids
    with torch.no_grad():
        expected = model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, eos_token_id=None)[0, len(ids):]
    out = LLM(str(path)).generate([prompt], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0].outputs[0]
    assert out.token_ids == expected.tolist()
    assert out.text == processor.decode(expected.tolist())
