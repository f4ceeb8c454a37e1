"""Sampler tests: parity with HF transformers' logits processors, chi-square on draws,
seeded reproducibility, greedy and penalty semantics, SamplingParams validation."""
import math
import re

import pytest
import torch

import reference as ref

from fastinfer.sampling import make_generator, process_logits, sample
from fastinfer.sampling_params import SamplingParams

logits_process = pytest.importorskip("transformers.generation.logits_process")

kProbAtol = 1e-6
kNumDraws = 100_000
kMinPValue = 1e-3


# ----------------------------------------------------------------------------- helpers

def hf_processors(params: SamplingParams, prompt_len: int = 0, eos_ids=None, min_new_tokens=0):
    """The LogitsProcessorList that transformers' `_get_logits_processor` builds for `params`."""
    processors = logits_process.LogitsProcessorList()
    if params.repetition_penalty != 1.0:
        processors.append(logits_process.RepetitionPenaltyLogitsProcessor(
            float(params.repetition_penalty)))
    if eos_ids and min_new_tokens > 0:
        processors.append(logits_process.MinNewTokensLengthLogitsProcessor(
            prompt_len, min_new_tokens, eos_ids))
    if params.greedy:  # do_sample=False: no warpers
        return processors
    if params.temperature != 1.0:
        processors.append(logits_process.TemperatureLogitsWarper(float(params.temperature)))
    if params.top_k > 0:
        processors.append(logits_process.TopKLogitsWarper(top_k=params.top_k, min_tokens_to_keep=1))
    if params.top_p < 1.0:
        processors.append(logits_process.TopPLogitsWarper(top_p=params.top_p, min_tokens_to_keep=1))
    if params.min_p > 0.0:
        processors.append(logits_process.MinPLogitsWarper(min_p=params.min_p, min_tokens_to_keep=1))
    return processors


def hf_process_rows(logits, params_per_row, input_ids, eos_ids=None, min_new_tokens=0):
    """HF-processed logits `[B, V]`, each row through the processors of its own params.

    input_ids `[B, L]`: the ids HF's repetition penalty sees; the last one counts as the
    only new token, so EOS is suppressed when min_new_tokens >= 2.
    """
    rows = []
    for row, params in enumerate(params_per_row):
        processors = hf_processors(params, input_ids.shape[1] - 1, eos_ids, min_new_tokens)
        rows.append(processors(input_ids[row:row + 1], logits[row:row + 1].clone()))
    return torch.cat(rows)


def random_case(batch_size=4, vocab_size=1000, seq_len=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch_size, vocab_size, generator=generator) * 3
    input_ids = torch.randint(vocab_size, (batch_size, seq_len), generator=generator)
    return logits, input_ids


def assert_same_processing(ours, theirs):
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs)), "different tokens masked"
    torch.testing.assert_close(ours.softmax(-1), theirs.softmax(-1), atol=kProbAtol, rtol=0)


def draw_counts(logits_row, params, num_draws, seen=(), suppress=None, seeded=False):
    """Histogram `[V]` of `num_draws` draws from one logit row repeated over a batch."""
    batch = logits_row.expand(num_draws, -1).contiguous()
    generators = [make_generator(i, "cpu") for i in range(num_draws)] if seeded else None
    tokens = sample(batch, [params] * num_draws, [list(seen)] * num_draws, [[]] * num_draws,
                    None if suppress is None else [suppress] * num_draws, generators)
    return torch.bincount(tokens, minlength=logits_row.shape[0]).double()



# ----------------------------------------------------------------------------- HF parity

HF_PARITY_CASES = [
    dict(temperature=0.7),
    dict(temperature=1.8),
    dict(top_k=5),
    dict(top_k=2000),  # larger than the vocabulary
    dict(top_p=0.8),
    dict(top_p=0.05),
    dict(min_p=0.1),
    dict(repetition_penalty=1.3),
    dict(repetition_penalty=0.7),
    dict(temperature=0.0, repetition_penalty=1.5),  # greedy: no warpers
    dict(temperature=0.6, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.2),
    dict(temperature=1.5, top_k=40, top_p=0.5),
    dict(temperature=0.5, top_p=0.95, min_p=0.2),
]


@pytest.mark.parametrize("kwargs", HF_PARITY_CASES, ids=str)
def test_processed_probs_match_hf(kwargs):
    logits, input_ids = random_case()
    params = SamplingParams(**kwargs)
    ours = process_logits(logits, [params] * 4, input_ids.tolist(), [[]] * 4)
    assert_same_processing(ours, hf_process_rows(logits, [params] * 4, input_ids))


def test_mixed_batch_matches_hf_row_by_row():
    logits, input_ids = random_case(batch_size=len(HF_PARITY_CASES), seed=1)
    params = [SamplingParams(**kwargs) for kwargs in HF_PARITY_CASES]
    ours = process_logits(logits, params, input_ids.tolist(), [[]] * len(params))
    assert_same_processing(ours, hf_process_rows(logits, params, input_ids))


@pytest.mark.parametrize("kwargs", [dict(top_k=3), dict(top_k=7, top_p=0.6), dict(top_p=0.3),
                                    dict(min_p=0.5)], ids=str)
def test_ties_at_the_boundary_match_hf(kwargs):
    # Integer logits in a small range: many exact ties at the top-k / top-p / min-p cut.
    generator = torch.Generator().manual_seed(2)
    logits = torch.randint(-3, 4, (6, 40), generator=generator).float()
    input_ids = torch.zeros(6, 1, dtype=torch.long)
    params = SamplingParams(**kwargs)
    ours = process_logits(logits, [params] * 6, input_ids.tolist(), [[]] * 6)
    assert_same_processing(ours, hf_process_rows(logits, [params] * 6, input_ids))


def test_min_tokens_suppression_matches_hf():
    logits, input_ids = random_case(seed=3)
    eos_ids = [5, 7]
    params = SamplingParams(temperature=0.8, top_p=0.9, repetition_penalty=1.1)
    ours = process_logits(logits, [params] * 4, input_ids.tolist(), [[]] * 4, [eos_ids] * 4)
    theirs = hf_process_rows(logits, [params] * 4, input_ids, eos_ids, min_new_tokens=3)
    assert torch.isinf(ours[:, eos_ids]).all()
    assert_same_processing(ours, theirs)


def test_process_logits_leaves_input_unchanged():
    logits, input_ids = random_case()
    before = logits.clone()
    params = SamplingParams(temperature=0.5, top_k=3, repetition_penalty=2.0, presence_penalty=1.0)
    process_logits(logits, [params] * 4, input_ids.tolist(), input_ids.tolist(), [[0]] * 4)
    assert torch.equal(logits, before)


# ----------------------------------------------------------------------------- chi-square

CHI_SQUARE_CASES = [
    dict(),
    dict(temperature=0.6),
    dict(top_k=7),
    dict(top_p=0.7),
    dict(min_p=0.15),
    dict(temperature=0.8, top_k=12, top_p=0.9, min_p=0.05, repetition_penalty=1.5),
]


def chi_square_logits():
    generator = torch.Generator().manual_seed(4)
    return torch.randn(32, generator=generator) * 1.5


@pytest.mark.parametrize("kwargs", CHI_SQUARE_CASES, ids=str)
def test_draws_follow_processed_distribution(kwargs):
    logits = chi_square_logits()
    params = SamplingParams(**kwargs)
    seen, suppress = [3, 4, 9], [0, 17]
    expected = hf_process_rows(logits[None], [params], torch.tensor([seen]),
                               eos_ids=suppress, min_new_tokens=2)[0].double().softmax(-1)
    assert (expected[suppress] == 0).all()
    torch.manual_seed(1234)
    counts = draw_counts(logits, params, kNumDraws, seen, suppress)
    assert counts[expected == 0].sum() == 0, "a masked token was drawn"
    assert ref.chi_square_pvalue(counts, expected) > kMinPValue


def test_seeded_draws_follow_processed_distribution():
    logits = chi_square_logits()
    params = SamplingParams(temperature=0.9, top_k=10, top_p=0.95)
    expected = hf_process_rows(logits[None], [params], torch.zeros(1, 1, dtype=torch.long))
    expected = expected[0].double().softmax(-1)
    counts = draw_counts(logits, params, 20_000, seeded=True)
    assert counts[expected == 0].sum() == 0
    assert ref.chi_square_pvalue(counts, expected) > kMinPValue


# ----------------------------------------------------------------------------- seeds

kSeedSteps = 16


def seeded_tokens(seed, batch_position, extra_rows):
    """kSeedSteps tokens of one seeded row placed among `extra_rows` other (params, generator)."""
    vocab_size = 50
    logits = torch.linspace(-1, 1, vocab_size)
    params = SamplingParams(temperature=0.9, top_k=40, seed=seed)
    generator = make_generator(seed, "cpu")
    torch.manual_seed(batch_position + 100)  # the default generator must not matter
    tokens = []
    for _ in range(kSeedSteps):
        rows = list(extra_rows)
        rows.insert(batch_position, (params, generator))
        batch_params = [p for p, _ in rows]
        generators = [g for _, g in rows]
        batch = logits.expand(len(rows), -1).contiguous()
        empty = [[] for _ in rows]
        tokens.append(int(sample(batch, batch_params, empty, empty, generators=generators)[batch_position]))
    return tokens


def test_seed_reproducible_alone_or_in_batch():
    others = [
        (SamplingParams(), None),
        (SamplingParams(temperature=0.0), None),
        (SamplingParams(top_p=0.5, seed=7), make_generator(7, "cpu")),
        (SamplingParams(temperature=2.0, min_p=0.3), None),
    ]
    alone = seeded_tokens(42, 0, [])
    assert seeded_tokens(42, 0, others) == alone
    assert seeded_tokens(42, 2, others) == alone
    assert seeded_tokens(42, 4, others[:3] + [(SamplingParams(), make_generator(42, "cpu"))]) == alone
    assert seeded_tokens(43, 0, []) != alone


def test_make_generator():
    assert make_generator(None, "cpu") is None
    first = torch.rand(4, generator=make_generator(5, "cpu"))
    assert torch.equal(first, torch.rand(4, generator=make_generator(5, "cpu")))


# ----------------------------------------------------------------------------- greedy, penalties

def greedy_pick(logits_row, seen=(), output=(), suppress=None, **kwargs):
    params = SamplingParams(temperature=0.0, **kwargs)
    return int(sample(torch.tensor([logits_row]), [params], [list(seen)], [list(output)],
                      None if suppress is None else [suppress])[0])


def test_greedy_is_argmax():
    logits, _ = random_case(batch_size=8)
    empty = [[] for _ in range(8)]
    tokens = sample(logits, [SamplingParams(temperature=0.0)] * 8, empty, empty)
    assert torch.equal(tokens, logits.argmax(-1))
    top_k_one = sample(logits, [SamplingParams(top_k=1)] * 8, empty, empty)
    assert torch.equal(top_k_one, logits.argmax(-1))


def test_greedy_takes_first_index_on_ties():
    assert greedy_pick([1.0, 3.0, 3.0, 2.0]) == 1


def test_repetition_penalty_changes_greedy_pick():
    assert greedy_pick([2.0, 1.5, -1.0, 0.5]) == 0
    assert greedy_pick([2.0, 1.5, -1.0, 0.5], seen=[0], repetition_penalty=2.0) == 1  # 2 / 2 = 1
    assert greedy_pick([-1.0, -1.5, -3.0], seen=[0], repetition_penalty=2.0) == 1  # -1 * 2 = -2
    assert greedy_pick([1.0, 1.5], seen=[0], repetition_penalty=0.5) == 0  # 1 / 0.5 = 2


def test_presence_and_frequency_on_output_tokens_only():
    logits = torch.zeros(1, 5)
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    prompt, output = [3, 3, 4], [1, 1, 2]
    processed = process_logits(logits, [params], [prompt + output], [output])
    # token 1: 0.5 + 2 * 0.25; token 2: 0.5 + 1 * 0.25; prompt tokens 3, 4 untouched.
    assert processed.tolist() == [[0.0, -1.0, -0.75, 0.0, 0.0]]
    assert greedy_pick([1.0, 0.9, 0.0], output=[0], presence_penalty=0.2) == 1
    assert greedy_pick([1.0, 0.9, 0.0], output=[0, 0], frequency_penalty=0.1) == 1
    assert greedy_pick([0.9, 1.0, 0.0], output=[0], presence_penalty=-0.2) == 0


def test_suppression_changes_greedy_pick():
    assert greedy_pick([3.0, 1.0, 2.0], suppress=[0]) == 2


def test_greedy_rows_skip_warpers_in_mixed_batch():
    logits, _ = random_case(batch_size=2)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.5, top_k=3)]
    processed = process_logits(logits, params, [[], []], [[], []])
    assert torch.equal(processed[0], logits[0])
    assert torch.isinf(processed[1]).sum() == logits.shape[1] - 3
    tokens = sample(logits, params, [[], []], [[], []])
    assert tokens[0] == logits[0].argmax()
    assert tokens[1] in logits[1].topk(3).indices


def test_bad_batch_arguments_raise():
    logits = torch.zeros(2, 5)
    with pytest.raises(ValueError, match="seen_ids"):
        sample(logits, [SamplingParams()] * 2, [[]], [[], []])
    with pytest.raises(ValueError, match="logits"):
        sample(logits.double(), [SamplingParams()] * 2, [[], []], [[], []])


# ----------------------------------------------------------------------------- validation

BAD_PARAMS = [
    ("n", dict(n=0)), ("n", dict(n=1.5)),
    ("max_tokens", dict(max_tokens=0)), ("max_tokens", dict(max_tokens=-3)),
    ("min_tokens", dict(min_tokens=-1)), ("min_tokens", dict(min_tokens=20, max_tokens=10)),
    ("temperature", dict(temperature=-1.0)), ("temperature", dict(temperature=math.nan)),
    ("temperature", dict(temperature=math.inf)), ("temperature", dict(temperature="0.5")),
    ("top_k", dict(top_k=-2)), ("top_k", dict(top_k=2.5)),
    ("top_p", dict(top_p=0.0)), ("top_p", dict(top_p=1.1)), ("top_p", dict(top_p=math.nan)),
    ("min_p", dict(min_p=-0.1)), ("min_p", dict(min_p=1.5)),
    ("repetition_penalty", dict(repetition_penalty=0.0)),
    ("repetition_penalty", dict(repetition_penalty=-1.0)),
    ("presence_penalty", dict(presence_penalty=2.5)),
    ("frequency_penalty", dict(frequency_penalty=-3.0)),
    ("seed", dict(seed=-1)), ("seed", dict(seed="1")),
    ("stop", dict(stop=5)), ("stop", dict(stop=[""])), ("stop", dict(stop=["a", 3])),
    ("stop_token_ids", dict(stop_token_ids=[-1])), ("stop_token_ids", dict(stop_token_ids=[1.0])),
    ("ignore_eos", dict(ignore_eos="yes")),
    ("logprobs", dict(logprobs=-1)),
    ("skip_special_tokens", dict(skip_special_tokens=None)),
]


@pytest.mark.parametrize("field,kwargs", BAD_PARAMS, ids=lambda x: str(x))
def test_bad_sampling_params_raise(field, kwargs):
    with pytest.raises(ValueError) as error:
        SamplingParams(**kwargs)
    message = str(error.value)
    assert re.match(rf"{field}\b", message), message
    assert repr(kwargs[field]) in message, message


def test_sampling_params_defaults_and_normalisation():
    params = SamplingParams(stop="###", stop_token_ids=(2,))
    assert params.stop == ["###"] and params.stop_token_ids == [2]
    assert not params.greedy
    # only temperature 0 is argmax; top_k = 1 samples among tied maxima, as HF's and vLLM's top-k keep ties
    assert SamplingParams(temperature=0).greedy and not SamplingParams(top_k=1).greedy
    assert SamplingParams(max_tokens=None, min_tokens=100).min_tokens == 100


@pytest.mark.cuda
def test_cuda_sampling_never_syncs_the_host():
    """The engine samples step n while step n + 1 is being launched: nothing in sample() may wait for
    the GPU (no .item(), no pageable copies), for every kind of row at once. The ids come back
    through the caller's own copy; torch raises on any synchronizing call in "error" mode."""
    device = torch.device("cuda")
    vocab = 300
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(5)).to(device)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, top_k=20),
              SamplingParams(top_p=0.8, min_p=0.02), SamplingParams(temperature=1.3, seed=11),
              SamplingParams(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.2),
              SamplingParams(temperature=0.9, top_k=5, top_p=0.9, seed=12)]
    seen = [[1, 2, 3, 3], [7], [], [250, 299, 5], [1, 1, 2, 600], [8, 9]]
    outs = [[3], [], [], [5], [1, 2], [9]]
    suppress = [[0], [], [4, 5], [], [], []]
    gens = [None, None, None, make_generator(11, device), None, make_generator(12, device)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ids = sample(logits, params, seen, outs, suppress, gens)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert ids.device.type == "cuda" and ids.shape == (6,)
    assert int(ids[0]) == int(logits[0].masked_fill(torch.arange(vocab, device=device) == 0, -1e30).argmax())


def test_chi_square_pvalue_matches_scipy():
    """reference.chi_square_pvalue (torch only: the GPU machine has no scipy) equals scipy's test."""
    stats = pytest.importorskip("scipy.stats")
    gen = torch.Generator().manual_seed(0)
    for bins, draws in [(2, 50), (7, 1000), (100, 100_000), (1000, 20_000)]:
        probs = torch.rand(bins, generator=gen, dtype=torch.float64) ** 3
        probs /= probs.sum()
        counts = torch.bincount(torch.multinomial(probs, draws, replacement=True, generator=gen),
                                minlength=bins).double()
        # scipy on the same merged bins (those expecting < 5 draws pooled into one)
        expected = probs * draws
        large = expected >= 5.0
        obs = torch.cat([counts[large], counts[~large].sum().reshape(1)])
        exp = torch.cat([expected[large], expected[~large].sum().reshape(1)])
        if exp[-1] == 0:
            obs, exp = obs[:-1], exp[:-1]
        exp = exp * (obs.sum() / exp.sum())
        want = stats.chisquare(obs.numpy(), exp.numpy()).pvalue
        got = ref.chi_square_pvalue(counts, probs)
        assert got == pytest.approx(want, rel=1e-9, abs=1e-300), (bins, draws)
    # a clearly wrong distribution is rejected
    counts = torch.tensor([600.0, 400.0])
    assert ref.chi_square_pvalue(counts, torch.tensor([0.5, 0.5])) < 1e-9
