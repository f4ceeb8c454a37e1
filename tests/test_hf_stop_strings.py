"""HF's stop_strings in fastinfer.generate (hf_stop_strings.py) against transformers' own generate, with
SmolLM2's real byte-level tokenizer on a random model: greedy and beam search, with and without EOS ids
(HF pads a row that completed a stop string only when there are EOS ids), strings inside one token,
across tokens, and in no output."""
from __future__ import annotations

import pytest
import torch

import fastinfer
from models import make_hf_model, smollm2_tokenizer

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def setup():
    tok = smollm2_tokenizer()
    tok.padding_side, tok.pad_token = "left", tok.eos_token
    model = make_hf_model("llama", seed=3, vocab_size=len(tok), eos_token_id=2, bos_token_id=1)
    batch = tok(["Hello there, friend", "The capital of France is", "x"], return_tensors="pt", padding=True)
    return tok, model, batch["input_ids"], batch["attention_mask"]


@pytest.mark.parametrize("eos", [None, [3, 5]], ids=["no-eos", "eos"])
@pytest.mark.parametrize("beams", [1, 3])
def test_stop_strings_match_hf(setup, eos, beams):
    tok, model, ids, mask = setup
    kw = dict(max_new_tokens=20, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=eos, num_beams=beams)
    free = fastinfer.generate(model, ids, attention_mask=mask, **kw)
    texts = [tok.decode(r[ids.shape[1]:]) for r in free]
    cases = [[texts[0][8:11], texts[1][15:17], "zzz"],  # every row stops, at different tokens
             [texts[0][8:11]],                          # one row stops
             [texts[2][2:9], texts[1][1:3]],            # inside the first new token
             ["zzz"]]                                   # none
    for stops in cases:
        with torch.no_grad():
            expected = model.generate(ids, attention_mask=mask, stop_strings=stops, tokenizer=tok, **kw)
        ours = fastinfer.generate(model, ids, attention_mask=mask, stop_strings=stops, tokenizer=tok, **kw)
        assert ours.shape == expected.shape and torch.equal(ours, expected), stops
    assert not torch.equal(fastinfer.generate(model, ids, attention_mask=mask, stop_strings=cases[0], tokenizer=tok,
                                              **kw), free), "the stop strings changed nothing: the test checks little"


def test_stop_strings_need_the_tokenizer_and_valid_strings(setup):
    tok, model, ids, mask = setup
    with pytest.raises(ValueError, match="stop_strings need the tokenizer"):
        fastinfer.generate(model, ids, attention_mask=mask, max_new_tokens=3, stop_strings=["a"])
    with pytest.raises(ValueError, match="stop_strings must be"):
        fastinfer.generate(model, ids, attention_mask=mask, max_new_tokens=3, stop_strings=[""], tokenizer=tok)


def test_stop_strings_with_a_streamer(setup):
    """The streamer sees the tokens up to the one that completed the string, no more."""
    tok, model, ids, mask = setup
    row, rmask = ids[1:2, mask[1].bool()], mask[1:2, mask[1].bool()]
    free = fastinfer.generate(model, row, attention_mask=rmask, max_new_tokens=12, do_sample=False, eos_token_id=[3])
    stop = tok.decode(free[0, row.shape[1]:])[15:17]

    class Recorder:
        def __init__(self):
            self.puts = []

        def put(self, value):
            self.puts.append(value)

        def end(self):
            pass
    rec = Recorder()
    out = fastinfer.generate(model, row, attention_mask=rmask, max_new_tokens=12, do_sample=False, eos_token_id=[3],
                             stop_strings=stop, tokenizer=tok, streamer=rec)
    with torch.no_grad():
        expected = model.generate(row, attention_mask=rmask, max_new_tokens=12, do_sample=False, eos_token_id=[3],
                                  stop_strings=stop, tokenizer=tok, pad_token_id=tok.pad_token_id)
    assert torch.equal(out, expected) and out.shape[1] < row.shape[1] + 12
    assert torch.cat([p.flatten() for p in rec.puts[1:]]).tolist() == out[0, row.shape[1]:].tolist()


def test_ids_the_tokenizer_lacks_never_match(setup):
    """A model vocabulary padded past the tokenizer's (Qwen-style): such an id, in the prompt or generated,
    matches nothing and no match crosses it, as HF's dummy row."""
    tok, _, _, _ = setup
    model = make_hf_model("llama", seed=3, vocab_size=len(tok) + 64, eos_token_id=2, bos_token_id=1)
    hello = tok.convert_tokens_to_ids("Hello")
    ids = torch.tensor([[hello, len(tok) + 10, 300, hello]])
    kw = dict(max_new_tokens=10, do_sample=False, eos_token_id=[2], pad_token_id=len(tok) + 5, tokenizer=tok)
    free = fastinfer.generate(model, ids, **{k: v for k, v in kw.items() if k != "tokenizer"})
    for stops in (["Hello"], [tok.decode(free[0, 4:6])[1:4]]):
        with torch.no_grad():
            expected = model.generate(ids, attention_mask=torch.ones_like(ids), stop_strings=stops, **kw)
        assert torch.equal(fastinfer.generate(model, ids, stop_strings=stops, **kw), expected), stops


def test_strings_no_token_can_end_are_refused():
    """A WordPiece vocabulary without the character: HF refuses the string, and so does fastinfer."""
    tokenizers = pytest.importorskip("tokenizers")
    letters = list("abcdef")
    vocab = {t: i for i, t in enumerate(["[UNK]", "[PAD]"] + letters + [f"##{c}" for c in letters])}
    wp = tokenizers.Tokenizer(tokenizers.models.WordPiece(vocab, unk_token="[UNK]"))
    wp.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    wp.decoder = tokenizers.decoders.WordPiece()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=wp, unk_token="[UNK]", pad_token="[PAD]")
    model = make_hf_model("llama", seed=3, vocab_size=len(tok))
    ids = torch.tensor([[2, 3]])
    kw = dict(max_new_tokens=3, do_sample=False, eos_token_id=None, stop_strings=["\u2603"], tokenizer=tok)
    with pytest.raises(ValueError):
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    with pytest.raises(ValueError, match="no token of this tokenizer can end"):
        fastinfer.generate(model, ids, **kw)
    kw["stop_strings"] = ["cd"]  # endable: accepted, HF's output
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    assert torch.equal(fastinfer.generate(model, ids, **kw), expected)
