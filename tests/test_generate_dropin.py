"""fastinfer.generate as a drop-in for HF ``model.generate``: the arguments a user migrating from
transformers passes (CPU, fp32, tiny random models). Every check runs HF's own ``generate`` on the same
model with the same arguments; where fastinfer deliberately refuses an argument, the test pins a clear
error naming it. Complements tests/test_generate.py and tests/test_generate_parity.py.
"""
from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

import fastinfer
from models import left_padded_batch, make_hf_model

transformers = pytest.importorskip("transformers")
PAD = 0


# HF warns about right padding, greedy with sampling flags, negative EOS ...: expected here.
pytestmark = pytest.mark.usefixtures("quiet_transformers")


@pytest.fixture(scope="module")
def model():
    return make_hf_model("llama", seed=2)


@pytest.fixture(scope="module")
def batch():
    return left_padded_batch([6, 11, 3], 320, PAD, seed=2)


def hf(model, ids, **kw):
    with torch.no_grad():
        return model.generate(ids, **kw)


def assert_same(model, ids, fi_model=None, **kw):
    expected = hf(model, ids, **kw)
    ours = fastinfer.generate(fi_model if fi_model is not None else model, ids, **kw)
    assert ours.dtype == expected.dtype and ours.shape == expected.shape, (ours.shape, expected.shape)
    assert torch.equal(ours, expected), f"\nfastinfer {ours.tolist()}\nHF        {expected.tolist()}"
    return expected


def emitted(model, ids, mask, row=1, step=3):
    """A token HF greedy emits in `row` at `step` (no EOS): an EOS id that really fires there."""
    ref = hf(model, ids, attention_mask=mask, max_new_tokens=step + 1, eos_token_id=None, pad_token_id=PAD)
    return int(ref[row, ids.shape[1] + step])


def right_padded(ids, mask):
    rids, rmask = torch.full_like(ids, PAD), torch.zeros_like(mask)
    for i in range(ids.shape[0]):
        n = int(mask[i].sum())
        rids[i, :n], rmask[i, :n] = ids[i, ids.shape[1] - n:], 1
    return rids, rmask


# ----------------------------------------------------------------------------- padding and prompts

@pytest.mark.parametrize("with_mask", [True, False], ids=["mask", "mask_inferred_from_pad"])
def test_right_padding_is_refused(model, batch, with_mask):
    """HF runs a right-padded row's last column (a pad) as the query of its first new token, so its output
    differs from the same prompt left-padded (it only warns). fastinfer refuses it instead of silently
    returning something else."""
    ids, mask = batch
    rids, rmask = right_padded(ids, mask)
    kw = dict(max_new_tokens=6, pad_token_id=PAD, eos_token_id=None)
    left = hf(model, ids, attention_mask=mask, **kw)[:, ids.shape[1]:]
    right = hf(model, rids, **({"attention_mask": rmask} if with_mask else {}), **kw)[:, ids.shape[1]:]
    assert torch.equal(left[1], right[1]) and not torch.equal(left[0], right[0]), "HF: padded rows change"
    with pytest.raises(ValueError, match="right-padded.*left padding"):
        fastinfer.generate(model, rids, **({"attention_mask": rmask} if with_mask else {}), **kw)


def test_prompts_as_inputs_keyword_and_bad_mask_type(model, batch):
    ids, mask = batch
    kw = dict(attention_mask=mask, max_new_tokens=4, pad_token_id=PAD, eos_token_id=None)
    with torch.no_grad():
        expected = model.generate(inputs=ids, **kw)
    assert torch.equal(fastinfer.generate(model, inputs=ids, **kw), expected)
    with pytest.raises(ValueError, match="generation_config"):  # HF's 2nd positional argument
        fastinfer.generate(model, ids, transformers.GenerationConfig(max_new_tokens=2))


@pytest.mark.parametrize("penalty", [None, 1.8])
def test_mask_inferred_from_left_pads_with_penalty(model, batch, penalty):
    ids, _ = batch
    assert_same(model, ids, max_new_tokens=8, pad_token_id=PAD, eos_token_id=2, repetition_penalty=penalty)


# ----------------------------------------------------------------------------- eos / pad forms

def test_eos_and_pad_token_forms_match_hf(model, batch):
    ids, mask = batch
    eos = emitted(model, ids, mask)
    for kw in [dict(eos_token_id=torch.tensor([eos, 7])), dict(eos_token_id=torch.tensor(eos)),
               dict(eos_token_id=(eos,), pad_token_id=torch.tensor(5)), dict(eos_token_id=[])]:
        kw = {"pad_token_id": PAD, **kw}
        out = assert_same(model, ids, attention_mask=mask, max_new_tokens=8, **kw)
        if kw["eos_token_id"] != []:
            assert out[1, -1] == kw["pad_token_id"], "row 1 finished and was padded"


def test_negative_eos_is_refused_clearly(model, batch):
    ids, mask = batch
    hf(model, ids, attention_mask=mask, max_new_tokens=2, eos_token_id=-1, pad_token_id=PAD)  # HF only warns
    with pytest.raises(ValueError, match="eos_token_id"):
        fastinfer.generate(model, ids, attention_mask=mask, max_new_tokens=2, eos_token_id=-1, pad_token_id=PAD)


def test_eos_comes_from_the_generation_config_not_the_model_config(batch):
    """HF 5 reads EOS / pad from the generation config only: a model whose generation_config.eos_token_id
    was cleared does not stop on its config.json EOS."""
    ids, mask = batch
    eos = emitted(make_hf_model("llama", seed=2), ids, mask)
    model = make_hf_model("llama", seed=2, eos_token_id=eos)
    model.generation_config.eos_token_id = None
    out = assert_same(model, ids, attention_mask=mask, max_new_tokens=8, pad_token_id=PAD)
    assert out[1, ids.shape[1] + 3] == eos and (out[:, -1] != PAD).all()


@pytest.mark.parametrize("gen_file", ["without_eos", "absent"])
def test_checkpoint_dir_eos_like_from_pretrained(tmp_path, batch, gen_file):
    """A checkpoint whose generation_config.json has no EOS: HF does not stop on config.json's EOS. With no
    generation_config.json at all HF builds one from config.json, EOS included."""
    ids, mask = batch
    eos = emitted(make_hf_model("llama", seed=2), ids, mask)
    make_hf_model("llama", seed=2, eos_token_id=eos, pad_token_id=PAD).save_pretrained(tmp_path)
    gen = tmp_path / "generation_config.json"
    if gen_file == "absent":
        gen.unlink()
    else:
        gen.write_text(json.dumps({k: v for k, v in json.loads(gen.read_text()).items() if k != "eos_token_id"}))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    out = assert_same(reloaded, ids, fi_model=str(tmp_path), attention_mask=mask, max_new_tokens=8)
    assert (out[1, -1] == PAD) == (gen_file == "absent")


# ----------------------------------------------------------------------------- lengths and configs

@pytest.mark.parametrize("where", ["generation_config", "model_generation_config"])
def test_max_length_20_set_explicitly_is_a_total_length(batch, where):
    """Only a max_length set nowhere means "20 new tokens"; max_length=20 set in a GenerationConfig or in
    the model's generation config is the total length, as any other value."""
    ids, mask = batch
    model = make_hf_model("llama", seed=2)
    kw = dict(attention_mask=mask, pad_token_id=PAD, eos_token_id=None)
    if where == "generation_config":
        kw["generation_config"] = transformers.GenerationConfig(max_length=20)
    else:
        model.generation_config.max_length = 20
    assert assert_same(model, ids, **kw).shape == (3, 20)


def test_explicit_none_keywords_override_the_model_config(batch):
    """generate(do_sample=None) is greedy and min_length=None builds no min-length processor in HF,
    whatever the model's generation config says."""
    ids, mask = batch
    eos = emitted(make_hf_model("llama", seed=2), ids, mask, step=1)
    model = make_hf_model("llama", seed=2, eos_token_id=eos)
    model.generation_config.do_sample, model.generation_config.top_k = True, 3
    model.generation_config.min_length = 18
    kw = dict(attention_mask=mask, max_new_tokens=8, pad_token_id=PAD)
    assert (assert_same(model, ids, do_sample=None, min_length=None, **kw)[:, -1] == PAD).any()


def test_generation_config_object_with_overriding_keywords(model, batch):
    ids, mask = batch
    gc = transformers.GenerationConfig(do_sample=True, top_k=5, max_new_tokens=9, pad_token_id=PAD,
                                       repetition_penalty=1.3)
    assert assert_same(model, ids, attention_mask=mask, generation_config=gc, do_sample=False,
                       max_new_tokens=5, synced_gpus=False).shape == (3, ids.shape[1] + 5)


# ----------------------------------------------------------------------------- greedy with sampling flags

@pytest.mark.parametrize("kw", [
    dict(temperature=0.5), dict(top_k=0, top_p=1.0), dict(min_p=0.5), dict(typical_p=0.5),
    dict(epsilon_cutoff=0.01), dict(eta_cutoff=0.01), dict(top_h=0.5), dict(suppress_tokens=[]),
    dict(begin_suppress_tokens=[]),
], ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_greedy_ignores_sampling_flags_like_hf(model, batch, kw):
    """do_sample=False: HF builds no sampling warper (it warns), whatever its value; empty suppress lists
    are no-ops."""
    ids, mask = batch
    assert_same(model, ids, attention_mask=mask, max_new_tokens=6, pad_token_id=PAD, do_sample=False, **kw)


@pytest.mark.parametrize("key, value", [("typical_p", 0.5), ("epsilon_cutoff", 3e-4), ("eta_cutoff", 3e-4)])
def test_typical_epsilon_eta_warpers_from_keywords_and_the_models_config(batch, key, value):
    """HF's typical / epsilon / eta warpers run with do_sample (HF's loop; top_k=1 keeps the draw
    deterministic): HF's tokens from a keyword, from the model's generation config, and with the
    model's value turned off by a None keyword."""
    ids, mask = batch
    model = make_hf_model("llama", seed=2)
    kw = dict(attention_mask=mask, max_new_tokens=4, pad_token_id=PAD, do_sample=True, top_k=1)
    assert_same(model, ids, **kw, **{key: value})
    setattr(model.generation_config, key, value)
    assert_same(model, ids, **kw)
    assert_same(model, ids, **kw, **{key: None})


# ----------------------------------------------------------------------------- sampling (deterministic cases)

@pytest.mark.parametrize("kw", [dict(top_k=1), dict(top_k=0, top_p=1e-6), dict(min_p=1.0, temperature=0.7)],
                         ids=str)
def test_num_return_sequences_sampling_layout_and_padding(model, batch, kw):
    """Sampling that keeps one candidate (deterministic in HF too): rows, their order and the padding of
    finished rows match HF exactly."""
    ids, mask = batch
    eos = emitted(model, ids, mask)
    out = assert_same(model, ids, attention_mask=mask, do_sample=True, num_return_sequences=3, max_new_tokens=8,
                      eos_token_id=[eos, 7], pad_token_id=PAD, **kw)
    assert out.shape[0] == 9 and (out[3:6, -1] == PAD).all()


# ----------------------------------------------------------------------------- streamer, stop strings

@pytest.fixture(scope="module")
def tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    wl = tokenizers.Tokenizer(tokenizers.models.WordLevel({f"w{i}": i for i in range(320)}, unk_token="w1"))
    wl.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    wl.decoder = tokenizers.decoders.WordPiece()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=wl, unk_token="w1", pad_token="w0")


@pytest.mark.parametrize("skip_prompt", [False, True])
def test_text_streamer_prints_what_hf_prints(model, tokenizer, skip_prompt):
    ids = torch.tensor([[11, 57, 203, 90, 14]])
    eos = int(hf(model, ids, max_new_tokens=4, eos_token_id=None)[0, -1])
    printed = []
    for run in (lambda **a: hf(model, ids, **a), lambda **a: fastinfer.generate(model, ids, **a)):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            out = run(max_new_tokens=8, eos_token_id=eos,
                      streamer=transformers.TextStreamer(tokenizer, skip_prompt=skip_prompt))
        printed.append((buf.getvalue(), out.tolist()))
    assert printed[0] == printed[1] and printed[0][1][0][-1] == eos


def test_stop_strings_with_a_tokenizer_hf_cannot_match_on(model, tokenizer):
    """HF's stop_strings (tests/test_hf_stop_strings.py has the parity sweep) need a tokenizer that
    round-trips plain text; this word-level one does not: HF raises, and so does fastinfer, before
    generating, with a message that says why."""
    ids = torch.tensor([[5, 6, 7]])
    kw = dict(max_new_tokens=4, do_sample=False, eos_token_id=None, stop_strings=["w9"], tokenizer=tokenizer)
    with pytest.raises(ValueError):
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    with pytest.raises(ValueError, match="stop_strings: this tokenizer does not round-trip"):
        fastinfer.generate(model, ids, **kw)
