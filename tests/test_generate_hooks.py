"""generate()'s hooks into HF's loop: logits_processor, stopping_criteria, prefix_allowed_tokens_fn and
max_time give HF's output token for token (CPU, fp32): greedy, seeded sampling and beam search, on
left-padded batches; duplicates of the processors / criteria HF builds itself are refused by name."""
from __future__ import annotations

import pytest
import torch

import fastinfer
from models import hf_and_ours, left_padded_batch, make_hf_model

transformers = pytest.importorskip("transformers")
PAD = 0


class BiasByLength(transformers.LogitsProcessor):
    """A processor that reads the rows: pushes token (last + 1) % vocab up and bans tokens of the row's
    length class, so its effect depends on every row's history and length."""

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        rows = torch.arange(scores.shape[0])
        scores[rows, (input_ids[:, -1] + 1) % scores.shape[1]] += 3.0
        scores[:, input_ids.shape[1] % 7::7] = float("-inf")
        return scores


class StopBelow(transformers.StoppingCriteria):
    """Ends a row whose newest token is below `limit` (a per-row bool tensor, as HF's criteria give)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.calls = 0

    def __call__(self, input_ids, scores, **kwargs):
        self.calls += 1
        return input_ids[:, -1] < self.limit


def allowed_tokens(batch_id: int, ids: torch.Tensor) -> list[int]:
    """A prefix constraint: after an even token only even ids, else ids in [100, 140); row 1 also 7."""
    base = list(range(0, 320, 2)) if int(ids[-1]) % 2 == 0 else list(range(100, 140))
    return base + [7] if batch_id == 1 else base


def both(model, ids, mask, **kw):
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, pad_token_id=PAD, **kw)
    return fastinfer.generate(model, ids, attention_mask=mask, pad_token_id=PAD, **kw), expected


@pytest.mark.parametrize("eos", [None, [5, 9]])
@pytest.mark.parametrize("variant", ["llama", "qwen2"])
def test_custom_logits_processor_greedy(variant, eos):
    model = make_hf_model(variant, seed=1)
    ids, mask = left_padded_batch([5, 17, 1, 33], model.config.vocab_size, PAD, seed=1)
    ours, expected = both(model, ids, mask, max_new_tokens=20, do_sample=False, eos_token_id=eos,
                          logits_processor=transformers.LogitsProcessorList([BiasByLength()]))
    assert torch.equal(ours, expected)
    plain = fastinfer.generate(model, ids, attention_mask=mask, pad_token_id=PAD, max_new_tokens=20,
                               do_sample=False, eos_token_id=eos)
    assert not torch.equal(plain, expected)  # the processor matters here


def test_custom_logits_processor_with_penalties_and_seeded_sampling():
    """After HF's own processors (repetition penalty, n-gram ban), before its warpers; sampling draws from
    torch's global generator, as HF does, so a seed gives HF's tokens."""
    model = make_hf_model("llama", seed=2)
    ids, mask = left_padded_batch([9, 4], model.config.vocab_size, PAD, seed=2)
    kw = dict(max_new_tokens=16, do_sample=True, temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.3,
              no_repeat_ngram_size=2, eos_token_id=None, num_return_sequences=2, logits_processor=[BiasByLength()])
    torch.manual_seed(5)
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, pad_token_id=PAD, **kw)
    torch.manual_seed(5)
    assert torch.equal(fastinfer.generate(model, ids, attention_mask=mask, pad_token_id=PAD, **kw), expected)


@pytest.mark.parametrize("eos", [None, [5]])
def test_custom_stopping_criteria(eos):
    """A criterion ends rows one by one; with EOS ids HF pads the finished rows, without it does not (the
    loop runs until every row has stopped)."""
    model = make_hf_model("llama", seed=3)
    ids, mask = left_padded_batch([5, 17, 1, 33], model.config.vocab_size, PAD, seed=3)
    criterion = StopBelow(60)
    ours, expected = both(model, ids, mask, max_new_tokens=30, do_sample=False, eos_token_id=eos,
                          stopping_criteria=transformers.StoppingCriteriaList([criterion]))
    assert torch.equal(ours, expected) and criterion.calls > 0
    assert expected.shape[1] < ids.shape[1] + 30  # stopped early


def test_prefix_allowed_tokens_fn_greedy_and_beams():
    model = make_hf_model("llama", seed=4)
    ids, mask = left_padded_batch([6, 13], model.config.vocab_size, PAD, seed=4)
    for kw in (dict(do_sample=False), dict(do_sample=False, num_beams=3, length_penalty=0.5)):
        ours, expected = both(model, ids, mask, max_new_tokens=12, eos_token_id=[9], prefix_allowed_tokens_fn=allowed_tokens,
                              **kw)
        assert torch.equal(ours, expected)
    with pytest.raises(ValueError, match="prefix_allowed_tokens_fn returned an empty list for batch ID 0"):
        fastinfer.generate(model, ids, attention_mask=mask, pad_token_id=PAD, max_new_tokens=3,
                           prefix_allowed_tokens_fn=lambda b, ids: [])


def test_custom_hooks_in_beam_search_with_scores():
    model = make_hf_model("qwen2", seed=5)
    ids, mask = left_padded_batch([7, 12], model.config.vocab_size, PAD, seed=5)
    kw = dict(max_new_tokens=10, do_sample=False, num_beams=3, num_return_sequences=2, eos_token_id=[4],
              return_dict_in_generate=True, output_scores=True, logits_processor=[BiasByLength()],
              stopping_criteria=[StopBelow(40)])
    ours, expected = both(model, ids, mask, **kw)
    assert torch.equal(ours.sequences, expected.sequences)
    torch.testing.assert_close(ours.sequences_scores, expected.sequences_scores)
    assert len(ours.scores) == len(expected.scores)


def test_max_time():
    """HF's MaxTimeCriteria: a budget already spent ends generation after the first token; a large one
    changes nothing."""
    model = make_hf_model("llama", seed=6)
    ids, mask = left_padded_batch([5, 9], model.config.vocab_size, PAD, seed=6)
    ours, expected = both(model, ids, mask, max_new_tokens=12, do_sample=False, eos_token_id=None, max_time=0.0)
    assert torch.equal(ours, expected) and ours.shape[1] == ids.shape[1] + 1
    ours, expected = both(model, ids, mask, max_new_tokens=12, do_sample=False, eos_token_id=None, max_time=1e6)
    assert torch.equal(ours, expected) and ours.shape[1] == ids.shape[1] + 12


@pytest.mark.parametrize("kwargs, match", [
    (dict(logits_processor=[transformers.RepetitionPenaltyLogitsProcessor(1.5)], repetition_penalty=1.2),
     "RepetitionPenaltyLogitsProcessor in logits_processor would replace"),
    (dict(stopping_criteria=[transformers.MaxLengthCriteria(3)]), "MaxLengthCriteria in stopping_criteria"),
    (dict(stopping_criteria=[transformers.EosTokenCriteria(5)], eos_token_id=5), "EosTokenCriteria"),
    (dict(logits_processor=[5]), "logits_processor must be a list of callables"),
    (dict(stopping_criteria="x"), "stopping_criteria must be a list of callables"),
    (dict(prefix_allowed_tokens_fn=[1, 2]), "prefix_allowed_tokens_fn must be a callable"),
    (dict(max_time=-1.0), "max_time must be a number"),
    (dict(max_time="1"), "max_time must be a number"),
    (dict(logits_processor=[BiasByLength()], prompt_lookup_num_tokens=3), "assisted generation"),
])
def test_bad_hooks_are_value_errors_naming_them(kwargs, match):
    model = make_hf_model("llama", seed=7)
    with pytest.raises(ValueError, match=match):
        fastinfer.generate(model, torch.tensor([[5, 6, 7]]), max_new_tokens=3, **kwargs)


def test_a_custom_processor_of_a_type_hf_does_not_build_here_is_accepted():
    """HF builds a RepetitionPenaltyLogitsProcessor only for repetition_penalty != 1: without one the
    custom processor is simply appended, as in HF."""
    model = make_hf_model("llama", seed=8)
    ids, mask = left_padded_batch([6, 3], model.config.vocab_size, PAD, seed=8)
    ours, expected = both(model, ids, mask, max_new_tokens=10, do_sample=False, eos_token_id=None,
                          logits_processor=[transformers.RepetitionPenaltyLogitsProcessor(3.0)])
    assert torch.equal(ours, expected)


class BanInPlace(transformers.LogitsProcessor):
    """The common in-place pattern: scores[:, ids] = -inf; return scores."""

    def __call__(self, input_ids, scores):
        scores[:, 100:200] = float("-inf")
        return scores


@pytest.mark.parametrize("kw", [dict(do_sample=False), dict(do_sample=True, top_k=5),
                                dict(do_sample=False, return_dict_in_generate=True, output_logits=True)],
                         ids=["greedy", "sampled", "raw-logits"])
def test_a_processor_editing_scores_in_place(kw):
    """HF hands processors an ordinary tensor (its raw logits, which an in-place edit changes too)."""
    model = make_hf_model("llama", seed=9)
    ids, mask = left_padded_batch([5, 11], model.config.vocab_size, PAD, seed=9)
    kw = dict(max_new_tokens=8, eos_token_id=None, logits_processor=[BanInPlace()], **kw)
    torch.manual_seed(3)
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, pad_token_id=PAD, **kw)
    torch.manual_seed(3)
    ours = fastinfer.generate(model, ids, attention_mask=mask, pad_token_id=PAD, **kw)
    if kw.get("return_dict_in_generate"):
        assert torch.equal(ours.sequences, expected.sequences)
        for a, b in zip(ours.logits, expected.logits):
            assert torch.equal(a.isinf(), b.isinf())  # the in-place ban shows in both raw logits
        return
    assert torch.equal(ours, expected)


def test_prefix_constraint_sees_prompt_ids_with_several_samples():
    """HF's constraint groups a prompt's num_return_sequences samples: batch_id is the prompt's index."""
    model = make_hf_model("llama", seed=10)
    ids, mask = left_padded_batch([6, 9], model.config.vocab_size, PAD, seed=10)
    seen = set()

    def fn(batch_id, sent):
        seen.add(batch_id)
        return allowed_tokens(batch_id, sent)
    kw = dict(max_new_tokens=6, do_sample=True, num_return_sequences=2, eos_token_id=None, prefix_allowed_tokens_fn=fn)
    torch.manual_seed(4)
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, pad_token_id=PAD, **kw)
    torch.manual_seed(4)
    assert torch.equal(fastinfer.generate(model, ids, attention_mask=mask, pad_token_id=PAD, **kw), expected)
    assert seen == {0, 1}


def test_unsatisfiable_prefix_step_forces_the_allowed_tokens_as_hf():
    """Where the min-length EOS ban leaves no allowed token, HF forces the allowed ones (score 0)."""
    model = make_hf_model("llama", seed=11)
    ids, mask = left_padded_batch([5], model.config.vocab_size, PAD, seed=11)
    kw = dict(max_new_tokens=6, do_sample=False, min_new_tokens=3, eos_token_id=[9],
              prefix_allowed_tokens_fn=lambda b, sent: [9, 11] if len(sent) % 2 else [9])
    ours, expected = both(model, ids, mask, **kw)
    assert torch.equal(ours, expected)


def test_prefix_constraint_with_suppress_tokens_and_extra_argument_processors_are_refused():
    model = make_hf_model("llama", seed=12)
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="prefix_allowed_tokens_fn with suppress_tokens"):
        fastinfer.generate(model, ids, max_new_tokens=2, suppress_tokens=[4],
                           prefix_allowed_tokens_fn=lambda b, s: [5])

    class ThreeArgs(transformers.LogitsProcessor):
        def __call__(self, input_ids, scores, cur_len=0):
            return scores
    with pytest.raises(ValueError, match="arguments beyond"):
        fastinfer.generate(model, ids, max_new_tokens=2, logits_processor=[ThreeArgs()])


@pytest.mark.parametrize("warper", [dict(typical_p=0.6), dict(epsilon_cutoff=0.01), dict(eta_cutoff=0.02),
                                    dict(typical_p=0.8, eta_cutoff=0.01, top_k=30, temperature=0.7),
                                    dict(top_h=0.4), dict(top_h=0.7, temperature=1.5, top_k=40)],
                         ids=["typical", "epsilon", "eta", "all", "top_h", "top_h-temperature-top_k"])
def test_typical_epsilon_eta_sampling_matches_hf_under_a_seed(warper):
    """HF's TypicalLogitsWarper / EpsilonLogitsWarper / EtaLogitsWarper after its other warpers; HF's loop
    draws from torch's global generator, so a seed gives HF's tokens (n = 2 rows per prompt)."""
    model = make_hf_model("llama", seed=13)
    ids, mask = left_padded_batch([6, 11], model.config.vocab_size, PAD, seed=13)
    ours, expected = hf_and_ours(model, ids, mask, seed=21, pad=PAD, max_new_tokens=12, do_sample=True,
                                 eos_token_id=[5], num_return_sequences=2, **warper)
    assert torch.equal(ours, expected)


def test_typical_beam_sampling_matches_hf():
    model = make_hf_model("qwen2", seed=14)
    ids, mask = left_padded_batch([7, 9], model.config.vocab_size, PAD, seed=14)
    ours, expected = hf_and_ours(model, ids, mask, seed=5, pad=PAD, max_new_tokens=8, do_sample=True, num_beams=2,
                                 typical_p=0.7, eos_token_id=[4])
    assert torch.equal(ours, expected)


def test_warper_values_hf_skips_or_refuses():
    model = make_hf_model("llama", seed=15)
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="typical_p"):
        fastinfer.generate(model, ids, max_new_tokens=2, do_sample=True, typical_p=0.0)
    with pytest.raises(ValueError, match="top_h"):
        fastinfer.generate(model, ids, max_new_tokens=2, do_sample=True, top_h=1.5)
    # HF builds no epsilon warper outside (0, 1) and no typical one at 1: plain sampling, the engine's path
    torch.manual_seed(1)
    out = fastinfer.generate(model, ids, max_new_tokens=2, do_sample=True, epsilon_cutoff=1.5, typical_p=1.0)
    assert out.shape == (1, 5)
    # greedy ignores them, as HF
    assert torch.equal(fastinfer.generate(model, ids, max_new_tokens=4, do_sample=False, typical_p=0.5, eta_cutoff=0.1),
                       fastinfer.generate(model, ids, max_new_tokens=4, do_sample=False))

