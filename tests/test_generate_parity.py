"""Review of fastinfer.generate as a drop-in for HF ``model.generate`` (CPU, fp32, tiny random models).

Every comparison runs HF's own ``generate`` on the same model with the same arguments. Tests named
``test_divergence_*`` pin behaviour where fastinfer differs from HF transformers (expected to fail until
fixed); the others add parity coverage that tests/test_generate.py does not have.
"""
from __future__ import annotations

import pytest
import torch

import fastinfer
from models import left_padded_batch, make_hf_model

transformers = pytest.importorskip("transformers")
PAD = 0


# HF warns about default max_length, unfeasible min lengths, pad == eos ...: expected here.
pytestmark = pytest.mark.usefixtures("quiet_transformers")


def hf(model, ids, **kw):
    with torch.no_grad():
        return model.generate(ids, **kw)


def _batch(seed=2, lengths=(6, 11, 3)):
    return left_padded_batch(list(lengths), 320, PAD, seed=seed)


def _emitted_token(model, ids, mask, row=1, step=3):
    """A token HF greedy emits in `row` at `step` (EOS disabled): used as an EOS that really fires."""
    ref = hf(model, ids, attention_mask=mask, max_new_tokens=step + 1, eos_token_id=None, pad_token_id=PAD)
    return int(ref[row, ids.shape[1] + step])


# ---------------------------------------------------------------------------------------------------
# Divergences (expected to fail until fixed)
# ---------------------------------------------------------------------------------------------------

def test_divergence_default_length_is_20_new_tokens():
    """No max_length / max_new_tokens anywhere: HF 5.x generates 20 NEW tokens (max_length = 20 + prompt
    width, capped at max_position_embeddings); fastinfer treats 20 as the total length."""
    model = make_hf_model("llama", seed=2)
    ids, mask = _batch()
    expected = hf(model, ids, attention_mask=mask, pad_token_id=PAD, eos_token_id=None)
    assert expected.shape == (3, ids.shape[1] + 20)
    ours = fastinfer.generate(model, ids, attention_mask=mask, pad_token_id=PAD, eos_token_id=None)
    assert ours.shape == expected.shape and torch.equal(ours, expected)


def test_divergence_default_length_long_prompt():
    """A 25-token prompt with default lengths: HF generates 20 tokens, fastinfer raises (max_new < 0)."""
    model = make_hf_model("llama", seed=2)
    ids = torch.randint(3, 320, (1, 25), generator=torch.Generator().manual_seed(3))
    expected = hf(model, ids, eos_token_id=None)
    assert expected.shape == (1, 45)
    assert torch.equal(fastinfer.generate(model, ids, eos_token_id=None), expected)


def test_divergence_explicit_eos_none_disables_eos():
    """HF: an explicit eos_token_id=None keyword overrides the model's EOS, so no row stops early.
    fastinfer drops None keywords and falls back to the model's EOS."""
    probe = make_hf_model("llama", seed=2)
    ids, mask = _batch()
    eos = _emitted_token(probe, ids, mask)
    model = make_hf_model("llama", seed=2, eos_token_id=eos)  # same weights, the model's EOS is `eos`
    kw = dict(max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=PAD)
    expected = hf(model, ids, attention_mask=mask, **kw)
    assert expected[1, ids.shape[1] + 3] == eos and (expected[:, -1] != PAD).all(), "HF ignores the model EOS"
    ours = fastinfer.generate(model, ids, attention_mask=mask, **kw)
    assert torch.equal(ours, expected)


def test_divergence_generation_config_change_after_first_call():
    """HF reads model.generation_config at every call; fastinfer caches the one it saw at load time
    (the cache key is the parameters only), so later edits are ignored."""
    model = make_hf_model("llama", seed=2)
    ids, mask = _batch()
    fastinfer.generate(model, ids, attention_mask=mask, pad_token_id=PAD, max_new_tokens=4)  # fills the cache
    model.generation_config.max_new_tokens = 3
    expected = hf(model, ids, attention_mask=mask, pad_token_id=PAD)
    ours = fastinfer.generate(model, ids, attention_mask=mask, pad_token_id=PAD)
    assert ours.shape == expected.shape == (3, ids.shape[1] + 3)
    assert torch.equal(ours, expected)


def test_divergence_min_new_tokens_above_max_new_tokens():
    """HF only warns (unfeasible lengths) and generates max_new_tokens with EOS suppressed; fastinfer
    raises from SamplingParams (min_tokens must be <= max_tokens)."""
    probe = make_hf_model("llama", seed=2)
    ids, mask = _batch()
    eos = _emitted_token(probe, ids, mask, step=1)
    model = make_hf_model("llama", seed=2)
    kw = dict(max_new_tokens=3, min_new_tokens=5, eos_token_id=eos, pad_token_id=PAD)
    expected = hf(model, ids, attention_mask=mask, **kw)
    assert expected.shape == (3, ids.shape[1] + 3)
    assert torch.equal(fastinfer.generate(model, ids, attention_mask=mask, **kw), expected)


def test_divergence_no_pad_no_eos_keeps_token_zero_in_prompt():
    """A model with neither pad nor EOS and no attention_mask: HF uses every prompt token. fastinfer
    invents pad_token_id=0 and then infers a mask from it, silently dropping real token-0s."""
    model = make_hf_model("llama", seed=2, eos_token_id=None)
    ids = torch.tensor([[5, 0, 17, 0, 42, 9]])
    expected = hf(model, ids, max_new_tokens=6)
    assert torch.equal(fastinfer.generate(model, ids, max_new_tokens=6), expected)


def test_divergence_repetition_penalty_ignores_left_padding():
    """HF 5.x builds RepetitionPenaltyLogitsProcessor(prompt_ignore_length=<left padding length per row>):
    left pads are NOT penalised, so a padded row generates exactly what it generates alone. fastinfer
    passes the left pads as extra_seen_ids and penalises them (HF 4.x behaviour)."""
    model = make_hf_model("llama", seed=2)
    short = torch.tensor([[11, 57, 203, 90, 14]])
    pad = int(hf(model, short, max_new_tokens=1, eos_token_id=None, pad_token_id=PAD)[0, -1])  # its first token
    ids = torch.tensor([[pad, pad, pad, 11, 57, 203, 90, 14], [33, 44, 55, 66, 77, 88, 99, 101]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [1] * 8])
    kw = dict(max_new_tokens=4, eos_token_id=None, pad_token_id=pad, repetition_penalty=3.0)
    expected = hf(model, ids, attention_mask=mask, **kw)
    assert torch.equal(expected[0, 8:], hf(model, short, **kw)[0, 5:]), "HF: padding changes nothing"
    assert expected[0, 8] == pad
    assert torch.equal(fastinfer.generate(model, ids, attention_mask=mask, **kw), expected)


def test_divergence_repetition_penalty_left_padded_batch():
    """The same root cause in an ordinary left-padded batch (pad 0): HF's row 3 emits token 0, which
    fastinfer penalises because the row's left pads are 0s."""
    model = make_hf_model("qwen2", seed=5)
    ids, mask = _batch(seed=5, lengths=(4, 13, 1, 8))
    kw = dict(max_new_tokens=12, eos_token_id=None, pad_token_id=PAD, repetition_penalty=1.8)
    assert torch.equal(fastinfer.generate(model, ids, attention_mask=mask, **kw),
                       hf(model, ids, attention_mask=mask, **kw))


def test_divergence_repetition_penalty_counts_masked_holes():
    """HF penalises masked tokens that come after a row's first real token (it skips only the left
    padding). fastinfer drops them from the seen set (it takes padded[:n_masked], i.e. real tokens)."""
    model = make_hf_model("llama", seed=2)
    prompt = torch.tensor([[11, 57, 203, 90, 14]])
    top = int(hf(model, prompt, max_new_tokens=1, eos_token_id=None, pad_token_id=PAD)[0, -1])
    ids = torch.tensor([[11, 57, top, 203, 90, 14]])  # `top` present but masked out
    mask = torch.tensor([[1, 1, 0, 1, 1, 1]])
    kw = dict(max_new_tokens=4, eos_token_id=None, pad_token_id=PAD)
    assert torch.equal(fastinfer.generate(model, ids, attention_mask=mask, **kw),
                       hf(model, ids, attention_mask=mask, **kw)), "the hole alone is handled like HF"
    kw["repetition_penalty"] = 5.0
    expected = hf(model, ids, attention_mask=mask, **kw)
    assert expected[0, ids.shape[1]] != top, "HF penalises the masked token"
    assert torch.equal(fastinfer.generate(model, ids, attention_mask=mask, **kw), expected)


@pytest.mark.parametrize("kwargs", [dict(max_new_tokens=0), dict(max_length=11)], ids=["max_new_0", "max_length_eq_width"])
def test_divergence_no_room_to_generate_raises_like_hf(kwargs):
    """HF raises ValueError when nothing would be generated; fastinfer silently returns the prompt."""
    model = make_hf_model("llama", seed=2)
    ids, mask = _batch()
    with pytest.raises(ValueError):
        hf(model, ids, attention_mask=mask, pad_token_id=PAD, **kwargs)
    with pytest.raises(ValueError):
        fastinfer.generate(model, ids, attention_mask=mask, pad_token_id=PAD, **kwargs)


@pytest.mark.parametrize("kwargs", [
    dict(guidance_scale=1.0), dict(low_memory=False), dict(penalty_alpha=0.0),
    dict(logits_processor=[]), dict(stopping_criteria=[]),
    dict(do_sample=False, top_p=0.0), dict(do_sample=False, top_k=-1),
], ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_divergence_hf_noop_values_are_accepted(kwargs):
    """Values that are no-ops in HF (its defaults, or warpers that greedy ignores) are rejected."""
    model = make_hf_model("llama", seed=2)
    ids, mask = _batch()
    expected = hf(model, ids, attention_mask=mask, max_new_tokens=3, pad_token_id=PAD, **kwargs)
    ours = fastinfer.generate(model, ids, attention_mask=mask, max_new_tokens=3, pad_token_id=PAD, **kwargs)
    assert torch.equal(ours, expected)


# ---------------------------------------------------------------------------------------------------
# Parity coverage (passing)
# ---------------------------------------------------------------------------------------------------

def test_eos_int_and_default_pad_match_hf():
    """eos_token_id as an int, no pad_token_id: HF pads finished rows with eos; so must fastinfer."""
    model = make_hf_model("llama", seed=2)
    ids, mask = _batch()
    eos = _emitted_token(model, ids, mask)
    kw = dict(max_new_tokens=10, eos_token_id=eos)
    expected = hf(model, ids, attention_mask=mask, **kw)
    ours = fastinfer.generate(model, ids, attention_mask=mask, **kw)
    assert (expected[1, ids.shape[1] + 4:] == eos).all(), "row 1 finished and is padded with eos"
    assert torch.equal(ours, expected)
    assert torch.equal(fastinfer.generate(model, ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[eos]),
                       expected)


def test_model_eos_and_all_rows_finishing_match_hf():
    """The model's own EOS (from its config) stops rows; the output is as wide as the longest row."""
    probe = make_hf_model("llama", seed=2)
    ids, mask = _batch()
    eos = _emitted_token(probe, ids, mask)
    model = make_hf_model("llama", seed=2, eos_token_id=eos, pad_token_id=PAD)
    expected = hf(model, ids, attention_mask=mask, max_new_tokens=12)
    assert torch.equal(fastinfer.generate(model, ids, attention_mask=mask, max_new_tokens=12), expected)


def test_max_length_counts_padded_width_like_hf():
    model = make_hf_model("llama-tied", seed=4)
    ids, mask = _batch(seed=4, lengths=(2, 9, 5))
    kw = dict(max_length=16, eos_token_id=None, pad_token_id=PAD)
    expected = hf(model, ids, attention_mask=mask, **kw)
    assert expected.shape == (3, 16)
    assert torch.equal(fastinfer.generate(model, ids, attention_mask=mask, **kw), expected)
    # max_new_tokens wins over max_length, as in HF
    kw = dict(max_length=12, max_new_tokens=5, eos_token_id=None, pad_token_id=PAD)
    assert torch.equal(fastinfer.generate(model, ids, attention_mask=mask, **kw),
                       hf(model, ids, attention_mask=mask, **kw))


@pytest.mark.parametrize("kw", [dict(min_length=16), dict(min_new_tokens=5), dict(min_new_tokens=5, min_length=30)],
                         ids=["min_length", "min_new_tokens", "min_new_tokens_wins"])
def test_min_lengths_suppress_eos_like_hf(kw):
    model = make_hf_model("llama", seed=2)
    ids, mask = _batch()
    eos = _emitted_token(model, ids, mask, step=1)
    args = dict(max_new_tokens=10, eos_token_id=[eos, 7], pad_token_id=PAD, **kw)
    expected = hf(model, ids, attention_mask=mask, **args)
    assert torch.equal(fastinfer.generate(model, ids, attention_mask=mask, **args), expected)


@pytest.mark.parametrize("penalty", [0.7, 1.8])
def test_repetition_penalty_unpadded_batch_matches_hf(penalty):
    """Equal-length rows (no padding: the left-padding divergence above plays no part)."""
    model = make_hf_model("qwen2", seed=5)
    ids = torch.randint(3, 320, (3, 9), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    kw = dict(max_new_tokens=12, eos_token_id=None, pad_token_id=PAD, repetition_penalty=penalty)
    assert torch.equal(fastinfer.generate(model, ids, attention_mask=mask, **kw),
                       hf(model, ids, attention_mask=mask, **kw))


def test_mask_inferred_from_pad_like_hf():
    """No attention_mask: HF infers it from pad_token_id when pad is not an EOS (left-padded batch)."""
    model = make_hf_model("mistral", seed=6)
    ids, mask = _batch(seed=6, lengths=(3, 8))
    kw = dict(max_new_tokens=8, eos_token_id=2, pad_token_id=PAD)
    expected = hf(model, ids, attention_mask=mask, **kw)
    assert torch.equal(hf(model, ids, **kw), expected)
    assert torch.equal(fastinfer.generate(model, ids, **kw), expected)


def test_prompt_of_length_one_matches_hf():
    model = make_hf_model("llama3-rope", seed=7)
    ids = torch.tensor([[42]])
    kw = dict(max_new_tokens=10, eos_token_id=None)
    assert torch.equal(fastinfer.generate(model, ids, **kw), hf(model, ids, **kw))


def test_generation_config_object_matches_hf():
    model = make_hf_model("llama", seed=2)
    ids, mask = _batch()
    eos = _emitted_token(model, ids, mask)
    gc = transformers.GenerationConfig(max_new_tokens=9, eos_token_id=eos, pad_token_id=PAD, repetition_penalty=1.2)
    expected = hf(model, ids, attention_mask=mask, generation_config=gc)
    assert torch.equal(fastinfer.generate(model, ids, attention_mask=mask, generation_config=gc), expected)


def test_model_generation_config_defaults_are_used_on_first_call():
    model = make_hf_model("llama", seed=8)
    model.generation_config.max_new_tokens = 4
    model.generation_config.repetition_penalty = 1.5
    ids, mask = _batch(seed=8)
    expected = hf(model, ids, attention_mask=mask, pad_token_id=PAD)
    assert expected.shape[1] == ids.shape[1] + 4
    assert torch.equal(fastinfer.generate(model, ids, attention_mask=mask, pad_token_id=PAD), expected)


def test_output_shape_dtype_device_and_input_untouched():
    model = make_hf_model("llama", seed=2)
    ids, mask = _batch()
    ids32, before = ids.int(), ids.clone()
    out = fastinfer.generate(model, ids32, attention_mask=mask, max_new_tokens=3, pad_token_id=PAD)
    expected = hf(model, ids32, attention_mask=mask, max_new_tokens=3, pad_token_id=PAD)
    assert out.dtype == expected.dtype == torch.long and out.device == ids.device
    assert out.shape == expected.shape and torch.equal(out, expected)
    assert torch.equal(ids, before) and torch.equal(out[:, :ids.shape[1]], ids)


def test_prompt_up_to_max_position_matches_hf_and_beyond_raises_clearly():
    """prompt + new == max_position_embeddings works like HF. Beyond it HF (RoPE, no position table) still
    generates, while fastinfer raises a clear error: a known, deliberate divergence."""
    model = make_hf_model("llama", seed=9, max_position_embeddings=64)
    ids = torch.randint(3, 320, (1, 61), generator=torch.Generator().manual_seed(9))
    kw = dict(max_new_tokens=3, eos_token_id=None)
    assert torch.equal(fastinfer.generate(model, ids, **kw), hf(model, ids, **kw))
    with pytest.raises(ValueError, match="maximum length"):
        fastinfer.generate(model, ids, max_new_tokens=4, eos_token_id=None)


@pytest.mark.parametrize("kwargs", [
    dict(force_words_ids=[[5]]),  # (sequence_bias, forced_bos / eos_token_id: tests/test_generate_bias_forced.py)
    dict(stop_strings=["x"]),
    dict(penalty_alpha=0.6, top_k=4),
    dict(num_beam_groups=2, num_beams=2, diversity_penalty=0.5),
    dict(stopping_criteria=[transformers.MaxLengthCriteria(3)]),  # duplicates HF's own (test_generate_hooks.py)
    dict(negative_prompt_ids=torch.tensor([[5]])),
    dict(custom_generate="x"), dict(position_ids=torch.tensor([[0, 1, 2]])),
], ids=lambda kw: "-".join(kw))
def test_unsupported_hf_arguments_raise(kwargs):
    model = make_hf_model("llama", seed=6)
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match=next(k for k in kwargs if k not in ("do_sample", "top_k", "num_return_sequences",
                                                                           "num_beams", "return_dict_in_generate"))):
        fastinfer.generate(model, ids, max_new_tokens=2, **kwargs)


def test_seeded_sampling_with_num_return_sequences_is_reproducible():
    model = make_hf_model("llama", seed=10)
    ids, mask = _batch(seed=10, lengths=(5, 2))
    kw = dict(max_new_tokens=8, do_sample=True, num_return_sequences=3, temperature=0.9, top_k=30,
              repetition_penalty=1.2, eos_token_id=None, pad_token_id=PAD)
    torch.manual_seed(7)
    a = fastinfer.generate(model, ids, attention_mask=mask, **kw)
    torch.manual_seed(7)
    b = fastinfer.generate(model, ids, attention_mask=mask, **kw)
    assert a.shape == (6, ids.shape[1] + 8) and torch.equal(a, b)
    assert torch.equal(a[:, :ids.shape[1]], ids.repeat_interleave(3, dim=0))


def test_sampling_top_k_1_equals_greedy():
    """do_sample with top_k=1 has one candidate: HF and fastinfer both reduce it to greedy."""
    model = make_hf_model("llama", seed=11)
    ids, mask = _batch(seed=11)
    base = dict(max_new_tokens=8, eos_token_id=None, pad_token_id=PAD)
    expected = hf(model, ids, attention_mask=mask, do_sample=False, **base)
    assert torch.equal(hf(model, ids, attention_mask=mask, do_sample=True, top_k=1, **base), expected)
    assert torch.equal(fastinfer.generate(model, ids, attention_mask=mask, do_sample=True, top_k=1, **base), expected)


@pytest.mark.parametrize("variant", ["llama", "qwen2"])
@pytest.mark.parametrize("size", [1, 2, 3])
def test_no_repeat_ngram_size_matches_hf(variant, size):
    """HF's no_repeat_ngram_size (NoRepeatNGramLogitsProcessor over the whole padded row, prompt and left
    padding included): greedy output token for token on a left-padded batch; the ban changes the output."""
    model = make_hf_model(variant, seed=5)
    ids, mask = left_padded_batch([5, 17, 1, 9], model.config.vocab_size, PAD, seed=2)
    kw = dict(max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=PAD, no_repeat_ngram_size=size)
    ours = fastinfer.generate(model, ids, attention_mask=mask, **kw)
    assert torch.equal(ours, hf(model, ids, attention_mask=mask, **kw))
    kw["no_repeat_ngram_size"] = 0
    assert not torch.equal(ours, fastinfer.generate(model, ids, attention_mask=mask, **kw))


def test_no_repeat_ngram_size_in_the_batch_api():
    """SamplingParams(no_repeat_ngram_size=n) in LLM.generate: no n-gram of prompt + output occurs twice;
    refused with speculative decoding (its proposals would need the ban at every position)."""
    from fastinfer import LLM, SamplingParams
    model = make_hf_model("llama", seed=5)
    llm = LLM(model, kv_cache_memory_bytes=8 << 20)
    prompt = [5, 17, 3, 5, 17, 8]
    for n in (2, 3):
        out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True,
                                                                         no_repeat_ngram_size=n), use_tqdm=False)
        seq = prompt + out[0].outputs[0].token_ids
        grams = [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]
        new = grams[len(prompt) - n + 1:]  # the n-grams that end in an output token
        assert len(set(new)) == len(new) and not set(new) & set(grams[:len(prompt) - n + 1])
    with pytest.raises(ValueError, match="no_repeat_ngram_size must be an int >= 0"):
        SamplingParams(no_repeat_ngram_size=-1)
    spec = LLM(model, kv_cache_memory_bytes=8 << 20, speculative={"method": "ngram", "num_tokens": 2})
    with pytest.raises(ValueError, match="no_repeat_ngram_size is not supported with speculative decoding"):
        spec.generate([prompt], SamplingParams(no_repeat_ngram_size=2), use_tqdm=False)
    with pytest.raises(ValueError, match="bad_words_ids is not supported with speculative decoding"):
        spec.generate([prompt], SamplingParams(bad_words_ids=[[3, 4]]), use_tqdm=False)
    with pytest.raises(ValueError, match="bad_words_ids must be None or a list of non-empty lists"):
        SamplingParams(bad_words_ids=[[]])
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True,
                                                                     bad_words_ids=[[17, 3], [8]]), use_tqdm=False)
    seq = prompt + out[0].outputs[0].token_ids
    new = seq[len(prompt) - 1:]
    assert 8 not in new[1:] and all(new[i:i + 2] != [17, 3] for i in range(len(new) - 1))


@pytest.mark.parametrize("variant", ["llama", "qwen2"])
@pytest.mark.parametrize("case", ["bad_words", "suppress", "all_three", "eos_bad_word"])
def test_bad_words_and_suppress_tokens_match_hf(variant, case):
    """HF's bad_words_ids (one-token words banned always, longer ones when the row ends with the rest; a
    one-token word that is an EOS id is dropped) and suppress_tokens: greedy output equals HF's on a
    left-padded batch, the words taken from the unconstrained output so that the bans bite."""
    model = make_hf_model(variant, seed=5)
    ids, mask = left_padded_batch([5, 17, 1, 9], model.config.vocab_size, PAD, seed=2)
    base = fastinfer.generate(model, ids, attention_mask=mask, pad_token_id=PAD, max_new_tokens=12, eos_token_id=None)
    toks = base[:, ids.shape[1]:].tolist()
    bad = [[toks[0][0]], toks[1][2:4], toks[2][3:6], [2]]
    kw = {"bad_words": dict(bad_words_ids=bad), "suppress": dict(suppress_tokens=[toks[3][0], toks[0][5]]),
          "all_three": dict(bad_words_ids=bad, suppress_tokens=[7], no_repeat_ngram_size=2),
          "eos_bad_word": dict(bad_words_ids=[[1], [toks[0][1]]], eos_token_id=1)}[case]
    kw = dict(max_new_tokens=16, do_sample=False, pad_token_id=PAD, **{"eos_token_id": None, **kw})
    ours = fastinfer.generate(model, ids, attention_mask=mask, **kw)
    assert torch.equal(ours, hf(model, ids, attention_mask=mask, **kw))
    assert not torch.equal(ours[:, :base.shape[1]], base)


@pytest.mark.parametrize("kwargs, match", [
    (dict(bad_words_ids=[[]]), "bad_words_ids must be a list of non-empty lists"),
    (dict(bad_words_ids=[5]), "bad_words_ids must be a list of non-empty lists"),
    (dict(bad_words_ids=[[5, -1]]), "bad_words_ids must be a list of non-empty lists"),
    (dict(suppress_tokens=[-3]), "suppress_tokens must"),
    (dict(bad_words_ids=[[10 ** 6, 5]]), "bad_words_ids has token ids outside the vocabulary"),
])
def test_bad_words_and_suppress_tokens_validated(kwargs, match):
    model = make_hf_model("llama", seed=6)
    with pytest.raises(ValueError, match=match):
        fastinfer.generate(model, torch.tensor([[5, 6, 7]]), max_new_tokens=2, **kwargs)
