"""Beam search (HF's num_beams > 1) in fastinfer.generate against HF transformers' own beam search.

HF and fastinfer run the same random fp32 model on the same left-padded batch; the outputs must be
equal token for token, shapes and fill values included. EOS ids are taken from the tokens the beams
produce without them, so that beams really finish early and the finished-beam bookkeeping (length
penalty, early stopping, the fill after a returned sequence's end) decides the result; each such case
also checks that the EOS ids change the output.
"""
from __future__ import annotations

import pytest
import torch

import fastinfer
from fastinfer import beam_search as bs
from fastinfer import hf_decoding
from fastinfer import gen_config
from fastinfer.generate import _prompts, get_loaded
from fastinfer.runner import ModelRunner
from models import left_padded_batch, make_hf_model

transformers = pytest.importorskip("transformers")

PAD = 0


def hf(model, ids, mask, **kw):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, **kw)


def frequent_tokens(model, ids, mask, count: int, **kw) -> list[int]:
    """The `count` tokens HF's beam search with these settings and no EOS returns most often (EOS
    candidates that bite)."""
    out = hf(model, ids, mask, **{**kw, "eos_token_id": None})
    values, counts = out[:, ids.shape[1]:].flatten().unique(return_counts=True)
    return values[counts.argsort(descending=True)][:count].tolist()


CASES = {
    "plain": dict(num_beams=3),
    "eos-n2": dict(num_beams=4, num_return_sequences=2, eos=2),
    "eos-lp0.5-early": dict(num_beams=2, length_penalty=0.5, early_stopping=True, eos=1, pad_token_id=2),
    "eos-lp2-never": dict(num_beams=3, length_penalty=2.0, early_stopping="never", eos=1),
    "eos-lp-neg": dict(num_beams=3, length_penalty=-1.0, eos=2),
    "processors": dict(num_beams=3, repetition_penalty=1.3, no_repeat_ngram_size=2, min_new_tokens=5, eos=2),
    "bans": dict(num_beams=3, bad_words_ids=[[7, 8], [9]], suppress_tokens=[10], eos=1),
    "pad0-fill": dict(num_beams=3, num_return_sequences=3, eos=3, pad_token_id=0),
    "pad5-fill": dict(num_beams=3, num_return_sequences=3, eos=3, pad_token_id=5),
}


@pytest.mark.parametrize("variant", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("case", list(CASES))
def test_beam_search_matches_hf(variant, case):
    model = make_hf_model(variant, seed=5)
    ids, mask = left_padded_batch([5, 17, 1, 9], model.config.vocab_size, PAD, seed=2)
    kw = dict(CASES[case])
    eos = kw.pop("eos", 0)
    kw = dict(max_new_tokens=20, do_sample=False, **{"pad_token_id": PAD, **kw})
    kw["eos_token_id"] = frequent_tokens(model, ids, mask, eos, **kw) if eos else None
    expected = hf(model, ids, mask, **kw)
    ours = fastinfer.generate(model, ids, attention_mask=mask, **kw)
    assert ours.shape == expected.shape and torch.equal(ours, expected)
    if eos:  # the EOS ids bite: without them the beams come out otherwise
        free = fastinfer.generate(model, ids, attention_mask=mask, **{**kw, "eos_token_id": None})
        assert free.shape != ours.shape or not torch.equal(free, ours), "the EOS ids changed nothing"


def test_beam_search_differs_from_greedy_and_returns_beams_best_first():
    model = make_hf_model("llama", seed=5)
    ids, mask = left_padded_batch([5, 17, 1, 9], model.config.vocab_size, PAD, seed=2)
    kw = dict(max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=PAD)
    greedy = fastinfer.generate(model, ids, attention_mask=mask, **kw)
    beams = fastinfer.generate(model, ids, attention_mask=mask, num_beams=4, num_return_sequences=4, **kw)
    assert beams.shape == (16, greedy.shape[1])
    assert not torch.equal(beams[::4], greedy)  # beam search finds other sequences than greedy here
    assert len({tuple(r) for r in beams[:4].tolist()}) == 4  # distinct beams per prompt


def test_decode_steps_from_static_buffers_give_the_same_beams():
    """The GPU path's static decode buffers (one graph bucket of batch * num_beams rows), run eagerly
    on the CPU: same output as the plain path."""
    model = make_hf_model("llama", seed=5)
    ids, mask = left_padded_batch([5, 17, 1], model.config.vocab_size, PAD, seed=2)
    kw = dict(max_new_tokens=14, do_sample=False, eos_token_id=[3, 4], pad_token_id=PAD, num_beams=3)
    expected = hf(model, ids, mask, **kw)
    loaded = get_loaded(model)
    settings = gen_config.resolve({}, None, dict(kw), ids.shape[1], [], None, loaded.model.config.max_position_embeddings)
    prompts, holes = _prompts(ids, mask, PAD, [3, 4], loaded.model.config.vocab_size)
    runners = []
    real = ModelRunner.enable_decode_graphs
    ModelRunner.enable_decode_graphs = lambda self, *a, **k: (runners.append(self), real(self, *a, **k))[1]
    try:
        ours = bs.beam_search(loaded, ids, prompts, holes, settings, decode_graphs=True)
    finally:
        ModelRunner.enable_decode_graphs = real
    assert torch.equal(ours, expected)
    assert runners and runners[0].graphs.num_steps > 0, "the static decode path did not run"


def test_blocks_are_shared_and_copied_on_write():
    model = get_loaded(make_hf_model("llama", seed=1)).model
    runner = ModelRunner(model, 8, 16)
    pool = hf_decoding.Blocks(runner)
    parent = [pool.take(), pool.take()]          # 32 positions: the second block half full
    child = pool.share(parent)
    assert pool.refs[parent[0]] == 2 and pool.refs[parent[1]] == 2
    for cache in runner.kv_caches:
        cache[parent[1]].normal_()
    copies = []
    pool.writable(child, 20, copies)             # inside the shared second block: copied
    assert child[0] == parent[0] and child[1] != parent[1] and copies == [(parent[1], child[1])]
    hf_decoding.copy_blocks(runner, copies)
    assert all(torch.equal(c[child[1]], c[parent[1]]) for c in runner.kv_caches)
    copies = []
    pool.writable(child, 21, copies)             # now its own: written in place
    pool.writable(child, 32, copies)             # a block boundary: a new block
    assert copies == [] and len(child) == 3
    pool.release(parent)
    pool.release(child)
    assert sorted(pool.free) == list(range(8)) and not any(pool.refs)


def test_beam_search_refuses_a_streamer():
    model = make_hf_model("llama", seed=6)
    with pytest.raises(ValueError, match="streamer cannot be used with beam search"):
        fastinfer.generate(model, torch.tensor([[5, 6, 7]]), max_new_tokens=3, num_beams=2, streamer=object())


@pytest.mark.cuda
@pytest.mark.parametrize("variant", ["llama", "qwen3"])
def test_beam_search_matches_hf_on_the_gpu(variant):
    """The GPU path (CUDA kernels, beams' copy-on-write blocks, one decode graph) in fp32 against HF's
    beam search on the same GPU, with EOS ids that end beams early."""
    model = make_hf_model(variant, seed=7, hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=64, intermediate_size=512).cuda()
    ids, mask = left_padded_batch([5, 17, 1, 33], model.config.vocab_size, PAD, seed=3)
    ids, mask = ids.cuda(), mask.cuda()
    kw = dict(max_new_tokens=24, do_sample=False, pad_token_id=PAD, num_beams=4, num_return_sequences=2)
    kw["eos_token_id"] = frequent_tokens(model, ids, mask, 2, **kw)
    expected = hf(model, ids, mask, **kw)
    ours = fastinfer.generate(model, ids, attention_mask=mask, **kw)
    assert ours.device == ids.device and torch.equal(ours, expected)


def test_return_dict_with_scores_matches_hf():
    """return_dict_in_generate with output_scores / output_logits: HF's GenerateBeamDecoderOnlyOutput, its
    sequences, beam_indices equal, sequences_scores and every step's processed log-probs (scores) and raw
    logits equal to fp32 rounding."""
    model = make_hf_model("qwen2", seed=5)
    ids, mask = left_padded_batch([5, 17, 1], model.config.vocab_size, PAD, seed=2)
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=PAD, num_beams=3, num_return_sequences=2,
              repetition_penalty=1.2, no_repeat_ngram_size=2, return_dict_in_generate=True, output_scores=True,
              output_logits=True)
    kw["eos_token_id"] = frequent_tokens(model, ids, mask, 2, **{k: v for k, v in kw.items()
                                                                 if k not in ("return_dict_in_generate", "output_scores",
                                                                              "output_logits")})
    expected = hf(model, ids, mask, **kw)
    ours = fastinfer.generate(model, ids, attention_mask=mask, **kw)
    assert type(ours) is type(expected)
    assert torch.equal(ours.sequences, expected.sequences) and torch.equal(ours.beam_indices, expected.beam_indices)
    torch.testing.assert_close(ours.sequences_scores, expected.sequences_scores, rtol=1e-5, atol=1e-5)
    assert len(ours.scores) == len(expected.scores) == len(ours.logits) == len(expected.logits)
    for a, b in zip(ours.scores + ours.logits, expected.scores + expected.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    plain = fastinfer.generate(model, ids, attention_mask=mask, **{**kw, "output_scores": False, "output_logits": False})
    assert plain.scores is None and plain.logits is None and plain.sequences_scores is None
    assert torch.equal(plain.sequences, expected.sequences)


def test_return_dict_without_beams():
    """Greedy / sampled: return_dict_in_generate gives HF's GenerateDecoderOnlyOutput with the sequences
    (the engine's path); without return_dict_in_generate HF ignores output_scores, and so does fastinfer."""
    model = make_hf_model("llama", seed=5)
    ids, mask = left_padded_batch([5, 9], model.config.vocab_size, PAD, seed=2)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    out = fastinfer.generate(model, ids, attention_mask=mask, return_dict_in_generate=True, **kw)
    expected = hf(model, ids, mask, return_dict_in_generate=True, **kw)
    assert type(out) is type(expected) and torch.equal(out.sequences, expected.sequences) and out.scores is None
    assert torch.equal(fastinfer.generate(model, ids, attention_mask=mask, output_scores=True, **kw), expected.sequences)
    with pytest.raises(ValueError, match="return_dict_in_generate must be True or False"):
        fastinfer.generate(model, ids, attention_mask=mask, return_dict_in_generate="yes", **kw)


@pytest.mark.parametrize("case", [
    dict(do_sample=False),
    dict(do_sample=False, eos=2, repetition_penalty=1.3, min_new_tokens=2, no_repeat_ngram_size=2),
    dict(do_sample=True, temperature=0.8, top_k=30, eos=2, num_return_sequences=2),
    dict(do_sample=True, top_p=0.9, min_p=0.02),
], ids=["greedy", "greedy-eos-processors", "sampled-eos-n2", "sampled-topp-minp"])
def test_scores_without_beams_match_hf(case):
    """output_scores / output_logits without beams: HF's loop step for step (every row every step, finished
    rows fed pad tokens with EOS ids), so the sequences are HF's (sampled ones under the same
    torch.manual_seed) and each step's processed scores and raw logits equal to fp32 rounding."""
    model = make_hf_model("llama", seed=5)
    ids, mask = left_padded_batch([5, 17, 1, 9], model.config.vocab_size, PAD, seed=2)
    kw = dict(case)
    eos = kw.pop("eos", 0)
    free = fastinfer.generate(model, ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None,
                              pad_token_id=PAD)
    kw = dict(max_new_tokens=12, pad_token_id=PAD, return_dict_in_generate=True, output_scores=True,
              output_logits=True, eos_token_id=[int(free[0, 20]), int(free[2, 22])][:eos] or None, **kw)
    torch.manual_seed(3)
    expected = hf(model, ids, mask, **kw)
    torch.manual_seed(3)
    ours = fastinfer.generate(model, ids, attention_mask=mask, **kw)
    assert type(ours) is type(expected) and torch.equal(ours.sequences, expected.sequences)
    assert len(ours.scores) == len(expected.scores) == len(ours.logits) == ours.sequences.shape[1] - ids.shape[1]
    for a, b in zip(ours.scores + ours.logits, expected.scores + expected.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    if eos:  # some row ended on an EOS and was padded after it, while the others ran on
        assert (ours.sequences[:, -1] == PAD).any()


@pytest.mark.parametrize("variant", ["llama", "qwen3"])
@pytest.mark.parametrize("case", [
    dict(num_beams=3),                                                        # HF's default top_k 50
    dict(num_beams=4, num_return_sequences=2, eos=2, temperature=0.7, top_k=20),
    dict(num_beams=3, top_p=0.8, min_p=0.05, repetition_penalty=1.2, top_k=0),
], ids=["defaults", "eos-temperature-topk", "topp-minp-penalty"])
def test_beam_sampling_matches_hf_under_the_same_seed(variant, case):
    """do_sample=True with num_beams: HF's warpers (keeping #EOS + 1 tokens) and torch.multinomial from the
    global generator, so torch.manual_seed before each run gives HF's output; another seed another one."""
    model = make_hf_model(variant, seed=5)
    ids, mask = left_padded_batch([5, 17, 1, 9], model.config.vocab_size, PAD, seed=2)
    kw = dict(case)
    eos = kw.pop("eos", 0)
    kw = dict(max_new_tokens=16, do_sample=True, pad_token_id=PAD, **kw)
    kw["eos_token_id"] = frequent_tokens(model, ids, mask, eos, **{**kw, "do_sample": False}) if eos else None
    torch.manual_seed(11)
    expected = hf(model, ids, mask, **kw)
    torch.manual_seed(11)
    ours = fastinfer.generate(model, ids, attention_mask=mask, **kw)
    assert torch.equal(ours, expected)
    torch.manual_seed(12)
    assert not torch.equal(fastinfer.generate(model, ids, attention_mask=mask, **kw), ours)
