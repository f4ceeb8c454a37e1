"""HF generate()'s sequence_bias (SequenceBiasLogitsProcessor), forced_bos_token_id, forced_eos_token_id,
exponential_decay_length_penalty, begin_suppress_tokens, renormalize_logits and remove_invalid_values through
fastinfer.generate: HF's output token for token (CPU, fp32) on left-padded batches, greedy, seeded
sampling and beam search; malformed values refused by name."""
from __future__ import annotations

import pytest
import torch

import fastinfer
from models import hf_and_ours, left_padded_batch, make_hf_model

transformers = pytest.importorskip("transformers")
PAD = 0


@pytest.fixture(scope="module")
def model():
    return make_hf_model("llama", seed=3)


@pytest.fixture(scope="module")
def batch(model):
    return left_padded_batch([5, 17, 1, 9], model.config.vocab_size, PAD, seed=3)


def both(model, ids, mask, seed=None, **kw):
    return hf_and_ours(model, ids, mask, seed=seed, pad=PAD, **{"max_new_tokens": 12, **kw})


def greedy_tokens(model, ids, mask):
    return fastinfer.generate(model, ids, attention_mask=mask, pad_token_id=PAD, max_new_tokens=12, do_sample=False,
                              eos_token_id=None)


def test_sequence_bias_greedy_single_and_multi_token(model, batch):
    ids, mask = batch
    free = greedy_tokens(model, ids, mask)
    width = ids.shape[1]
    a, b = int(free[1, width + 2]), int(free[1, width + 3])
    # ban row 1's 4th token after its 3rd, push token 7 up everywhere, and a pair no row produces
    bias = [[[a, b], -100.0], [[7], 4.5], [[300, 301, 302], 50.0]]
    ours, expected = both(model, ids, mask, do_sample=False, eos_token_id=None, sequence_bias=bias)
    assert torch.equal(ours, expected) and not torch.equal(ours, free)
    as_dict = {tuple(ids_): value for ids_, value in bias}  # HF's older dict form
    assert torch.equal(both(model, ids, mask, do_sample=False, eos_token_id=None, sequence_bias=as_dict)[0], expected)


def test_sequence_bias_with_penalties_sampling_and_beams(model, batch):
    ids, mask = batch
    bias = [[[11], 3.0], [[12, 13], 8.0]]
    # HF applies the bias before the repetition penalty: the order shows on a biased token already seen
    ours, expected = both(model, ids, mask, do_sample=False, eos_token_id=None, sequence_bias=bias,
                          repetition_penalty=1.8)
    assert torch.equal(ours, expected)
    ours, expected = both(model, ids, mask, seed=5, do_sample=True, top_k=20, eos_token_id=[5],
                          sequence_bias=bias)
    assert torch.equal(ours, expected)
    ours, expected = both(model, ids, mask, do_sample=False, num_beams=3, eos_token_id=[5], sequence_bias=bias)
    assert torch.equal(ours, expected)


@pytest.mark.parametrize("forced, eos", [(7, None), ([7, 9], None), (5, [5])])
def test_forced_eos_token_is_the_last_one(model, batch, forced, eos):
    ids, mask = batch
    ours, expected = both(model, ids, mask, do_sample=False, eos_token_id=eos, forced_eos_token_id=forced)
    assert torch.equal(ours, expected)
    ours, expected = both(model, ids, mask, do_sample=False, num_beams=2, eos_token_id=eos, forced_eos_token_id=forced)
    assert torch.equal(ours, expected)


def test_forced_bos_token_on_a_one_token_prompt(model):
    one = torch.tensor([[17], [23]])
    ours, expected = both(model, one, torch.ones_like(one), do_sample=False, eos_token_id=None, forced_bos_token_id=42)
    assert torch.equal(ours, expected) and (ours[:, 1] == 42).all()
    longer = torch.tensor([[17, 18], [23, 24]])  # HF forces it only while the row is 1 token long
    ours, expected = both(model, longer, torch.ones_like(longer), do_sample=False, eos_token_id=None,
                          forced_bos_token_id=42)
    assert torch.equal(ours, expected)


def test_exponential_decay_length_penalty(model, batch):
    ids, mask = batch
    for kw in (dict(do_sample=False), dict(do_sample=False, num_beams=2), dict(do_sample=True, top_k=30)):
        ours, expected = both(model, ids, mask, seed=6, eos_token_id=[5, 9], exponential_decay_length_penalty=(2, 3.0),
                              **kw)
        assert torch.equal(ours, expected), kw


def test_begin_suppress_tokens(model, batch):
    ids, mask = batch
    free = greedy_tokens(model, ids, mask)
    first = sorted({int(t) for t in free[:, ids.shape[1]]})
    ours, expected = both(model, ids, mask, do_sample=False, eos_token_id=None, begin_suppress_tokens=first)
    assert torch.equal(ours, expected) and not torch.equal(ours, free)
    assert not set(ours[:, ids.shape[1]].tolist()) & set(first)
    # with a forced BOS on a 1-token prompt HF bans them at the step after it: ban what that step would take
    one = torch.tensor([[17], [23]])
    forced = fastinfer.generate(model, one, attention_mask=torch.ones_like(one), pad_token_id=PAD, max_new_tokens=4,
                                do_sample=False, eos_token_id=None, forced_bos_token_id=42)
    after_bos = sorted({int(t) for t in forced[:, 2]} - {42})
    ours, expected = both(model, one, torch.ones_like(one), do_sample=False, eos_token_id=None, forced_bos_token_id=42,
                          begin_suppress_tokens=after_bos + [42])  # 42 too: HF forces it first all the same
    assert torch.equal(ours, expected) and (ours[:, 1] == 42).all()
    assert not set(ours[:, 2].tolist()) & set(after_bos)


def test_renormalize_logits_changes_the_scores_not_the_tokens(model, batch):
    ids, mask = batch
    kw = dict(return_dict_in_generate=True, output_scores=True, eos_token_id=[5], renormalize_logits=True)
    for extra in (dict(do_sample=False), dict(do_sample=True, top_k=10), dict(do_sample=False, num_beams=2)):
        ours, expected = both(model, ids, mask, seed=8, **kw, **extra)
        assert torch.equal(ours.sequences, expected.sequences), extra
        torch.testing.assert_close(torch.stack(ours.scores), torch.stack(expected.scores), rtol=0, atol=1e-5)


def test_remove_invalid_values_turns_bans_into_finite_scores(model, batch):
    """HF's InfNanRemoveLogitsProcessor after the bans and the forced EOS: -inf becomes the float minimum in the
    scores HF returns; the tokens are unchanged."""
    ids, mask = batch
    kw = dict(return_dict_in_generate=True, output_scores=True, eos_token_id=[5], remove_invalid_values=True,
              min_new_tokens=3, bad_words_ids=[[11]], forced_eos_token_id=5)
    for extra in (dict(do_sample=False), dict(do_sample=False, num_beams=2)):
        ours, expected = both(model, ids, mask, **kw, **extra)
        assert torch.equal(ours.sequences, expected.sequences), extra
        torch.testing.assert_close(torch.stack(ours.scores), torch.stack(expected.scores), rtol=0, atol=1e-5)
        assert torch.isfinite(torch.stack(ours.scores)).all()


def test_invalid_values_are_replaced_before_the_length_penalty(model, batch):
    """HF's order: InfNanRemove turns min_new_tokens' -inf EOS into the float minimum, then the length penalty
    scales that (to -inf / inf, whatever HF gets): the same returned scores and tokens."""
    ids, mask = batch
    kw = dict(return_dict_in_generate=True, output_scores=True, eos_token_id=[5], remove_invalid_values=True,
              min_new_tokens=6, exponential_decay_length_penalty=(1, 1.5), do_sample=False, max_new_tokens=8)
    ours, expected = both(model, ids, mask, **kw)
    assert torch.equal(ours.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(ours.scores), torch.stack(expected.scores), rtol=1e-6, atol=1e-5)


def test_settings_from_the_models_generation_config_and_explicit_none(batch):
    """A model's generation config may carry these (Whisper's carries begin_suppress_tokens); an explicit None
    keyword turns one off, as HF's generation_config.update does."""
    ids, mask = batch
    configured = make_hf_model("llama", seed=3)
    configured.generation_config.forced_eos_token_id = 7
    configured.generation_config.sequence_bias = [[[9], 6.0]]
    for kw in (dict(), dict(forced_eos_token_id=None), dict(sequence_bias=None),
               dict(forced_eos_token_id=None, sequence_bias=None)):
        ours, expected = both(configured, ids, mask, do_sample=False, eos_token_id=None, **kw)
        assert torch.equal(ours, expected), kw


@pytest.mark.parametrize("kw, match", [
    (dict(sequence_bias=[[[1, 2], "a"]]), "sequence_bias"),
    (dict(sequence_bias=[[[7], 5]]), "sequence_bias"),          # HF wants float biases
    (dict(sequence_bias=[[(7, 8), 5.0]]), "sequence_bias"),     # and lists of ids in the list form
    (dict(sequence_bias=[]), "sequence_bias"),
    (dict(sequence_bias=[[[], 1.0]]), "sequence_bias"),
    (dict(sequence_bias=[[[-1], 1.0]]), "sequence_bias"),
    (dict(sequence_bias=5), "sequence_bias"),
    (dict(sequence_bias=[[[400], 1.0]]), "vocabulary size"),
    (dict(forced_bos_token_id=[1, 2]), "forced_bos_token_id"),
    (dict(forced_eos_token_id=-3), "forced_eos_token_id"),
    (dict(forced_eos_token_id=7, suppress_tokens=[7]), "suppress_tokens"),
    (dict(exponential_decay_length_penalty=(2,)), "exponential_decay_length_penalty"),
    (dict(exponential_decay_length_penalty=(2, 1.5), eos_token_id=None), "needs an eos_token_id"),
    (dict(begin_suppress_tokens=[-1]), "begin_suppress_tokens"),
    (dict(renormalize_logits="yes"), "renormalize_logits"),
    (dict(remove_invalid_values=True, suppress_tokens=[3]), "remove_invalid_values"),
])
def test_bad_values_are_refused(model, batch, kw, match):
    ids, mask = batch
    with pytest.raises(ValueError, match=match):
        fastinfer.generate(model, ids, attention_mask=mask, pad_token_id=PAD, max_new_tokens=4, do_sample=False, **kw)


def test_a_custom_duplicate_of_a_built_processor_is_refused(model, batch):
    ids, mask = batch
    proc = transformers.generation.logits_process.SequenceBiasLogitsProcessor([[[7], 1.0]])
    with pytest.raises(ValueError, match="SequenceBiasLogitsProcessor"):
        fastinfer.generate(model, ids, attention_mask=mask, pad_token_id=PAD, max_new_tokens=4,
                           sequence_bias=[[[8], 1.0]], logits_processor=transformers.LogitsProcessorList([proc]))
