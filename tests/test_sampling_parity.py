"""Review of the sampler's semantics against HF transformers' generate(do_sample=...) pipeline
(processors built by transformers' own `GenerationMixin._get_logits_processor`, in its order) and
OpenAI/vLLM presence/frequency semantics; seeded reproducibility; chi-square on draws.

The HF side is built end to end from generate() keyword arguments on a tiny random Llama (only
its generation config and processor factory are used, never its forward), the fastinfer side from
the same keywords through `fastinfer.gen_config.resolve` -> SamplingParams -> process_logits/sample.
"""
import math

import pytest
import torch

import reference as ref

from fastinfer.gen_config import resolve
from fastinfer.sampling import make_generator, process_logits, sample
from fastinfer.sampling_params import SamplingParams

transformers = pytest.importorskip("transformers")
logits_process = pytest.importorskip("transformers.generation.logits_process")

kInf = math.inf
kEos = 2
kPad = 0
kProbAtol = 1e-6
kMinPValue = 1e-3
kDraws = 20_000


# ----------------------------------------------------------------------------- HF side

@pytest.fixture(scope="module")
def hf_model():
    config = transformers.LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, eos_token_id=kEos,
                                      pad_token_id=kPad, bos_token_id=1)
    return transformers.LlamaForCausalLM(config)


def hf_processors(model, model_defaults: dict, kwargs: dict, prompt_len: int):
    """(processors, generation_config) exactly as transformers' generate() builds them."""
    model.generation_config = transformers.GenerationConfig(**model_defaults, eos_token_id=kEos, pad_token_id=kPad)
    generation_config, _ = model._prepare_generation_config(None, **kwargs)
    model._prepare_special_tokens(generation_config, False, device="cpu")
    processors = model._get_logits_processor(generation_config, input_ids_seq_length=prompt_len,
                                             encoder_input_ids=None, device="cpu", model_kwargs={})
    return processors, generation_config


def hf_process(model, logits, input_ids, prompt_len, kwargs, model_defaults=None):
    """HF-processed scores [B, V] and whether HF samples (do_sample)."""
    processors, generation_config = hf_processors(model, model_defaults or {}, kwargs, prompt_len)
    return processors(input_ids, logits.clone()), bool(generation_config.do_sample)


# ----------------------------------------------------------------------------- fastinfer side

def fi_params(kwargs, prompt_len, model_defaults=None):
    settings = resolve(model_defaults or {}, None, dict(kwargs), prompt_len, [kEos], kPad)
    return settings.sampling, settings.min_new_tokens


def fi_lists(input_ids, prompt_len, min_new):
    seen = input_ids.tolist()
    outs = [row[prompt_len:] for row in seen]
    suppress = [[kEos] if len(o) < min_new else [] for o in outs]
    return seen, outs, suppress


def fi_process(logits, input_ids, prompt_len, kwargs, model_defaults=None):
    params, min_new = fi_params(kwargs, prompt_len, model_defaults)
    seen, outs, suppress = fi_lists(input_ids, prompt_len, min_new)
    batch = logits.shape[0]
    return process_logits(logits, [params] * batch, seen, outs, suppress), params


def assert_same_kept_and_probs(ours, theirs):
    kept_ours, kept_theirs = ~torch.isinf(ours), ~torch.isinf(theirs)
    assert torch.equal(kept_ours, kept_theirs), (
        f"kept-token sets differ:\nfastinfer {kept_ours.int().tolist()}\nHF        {kept_theirs.int().tolist()}")
    torch.testing.assert_close(ours.softmax(-1), theirs.softmax(-1), atol=kProbAtol, rtol=0)


# ----------------------------------------------------------------------------- hand-made logits

kPromptLen = 3


def crafted_case():
    """Small-vocab fp32 rows with ties, -inf holes, a single finite entry, exact-power-of-two
    probabilities (cumulative sums hit top-p thresholds exactly), and negative logits."""
    ninf = -kInf
    logits = torch.tensor([
        [3.0, 3.0, 2.0, 2.0, 2.0, 1.0, 1.0, 0.0, 0.0, -1.0, ninf, ninf],       # ties everywhere
        [ninf, ninf, ninf, ninf, ninf, 0.7, ninf, ninf, ninf, ninf, ninf, ninf],  # one finite entry
        [0.0, 0.0, 0.0, 0.0, ninf, ninf, ninf, ninf, ninf, ninf, ninf, ninf],    # uniform over 4: p = 1/4 exactly
        [-1.0, 2.0, -0.5, 0.5, 1.0, -2.0, 3.0, ninf, 0.0, 0.0, 1.5, -3.0],      # signs (repetition penalty)
        [10.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, ninf, 0.0, 0.0, 0.0],        # peaked
        [ninf, 1.0, 1.0, ninf, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, ninf, ninf],      # uniform over 8 with holes
        [1.0, 1.0, 0.0, 0.0, ninf, 0.0, 0.0, 0.0, -kInf, 2.0, 2.0, 0.5],        # tie at the max, min_p ties
    ], dtype=torch.float32)
    # prompt [1, 6, 9], output [3, 3, 10] (token 3 twice, ids 1/6/9 prompt-only)
    input_ids = torch.tensor([[1, 6, 9, 3, 3, 10]] * logits.shape[0])
    return logits, input_ids


PARITY_KWARGS = [
    dict(do_sample=True),                            # HF default top_k=50 (>= V: no-op)
    dict(do_sample=True, top_k=3),                   # ties at the top-k boundary
    dict(do_sample=True, top_k=2, temperature=0.5),
    dict(do_sample=True, top_k=12),
    dict(do_sample=True, top_p=0.75),                # cumsum == 1 - top_p exactly on the uniform rows
    dict(do_sample=True, top_p=0.5),
    dict(do_sample=True, top_p=0.25),
    dict(do_sample=True, top_p=0.01),                # min_tokens_to_keep=1
    dict(do_sample=True, top_p=0.999),
    dict(do_sample=True, min_p=0.3),
    dict(do_sample=True, min_p=0.3, temperature=0.5),  # min_p after temperature
    dict(do_sample=True, min_p=0.3, temperature=2.0),
    dict(do_sample=True, min_p=1.0),                 # only the (tied) maxima survive
    dict(do_sample=True, temperature=0.7, top_k=4, top_p=0.8, min_p=0.1, repetition_penalty=1.3),
    dict(do_sample=True, repetition_penalty=0.6, top_p=0.9, top_k=0),
    dict(do_sample=True, min_new_tokens=5, top_k=3, temperature=1.5),  # EOS suppressed (3 new < 5)
    dict(do_sample=True, min_new_tokens=3, top_k=3),  # 3 new tokens: EOS allowed again
]


@pytest.mark.parametrize("kwargs", PARITY_KWARGS, ids=str)
def test_kept_sets_match_hf_generate_pipeline(hf_model, kwargs):
    logits, input_ids = crafted_case()
    theirs, do_sample = hf_process(hf_model, logits, input_ids, kPromptLen, kwargs)
    assert do_sample
    ours, params = fi_process(logits, input_ids, kPromptLen, kwargs)
    assert not params.greedy
    assert_same_kept_and_probs(ours, theirs)


def test_explicit_kept_sets_at_boundaries(hf_model):
    """Spelled-out expectations (not just 'same as HF') for the boundary cases."""
    logits, input_ids = crafted_case()

    def kept(kwargs, row):
        ours, _ = fi_process(logits, input_ids, kPromptLen, kwargs)
        return torch.nonzero(~torch.isinf(ours[row])).flatten().tolist()

    assert kept(dict(do_sample=True, top_k=3), 0) == [0, 1, 2, 3, 4]  # 3rd largest is 2: all ties kept
    assert kept(dict(do_sample=True, top_k=3), 1) == [5]
    assert len(kept(dict(do_sample=True, top_p=0.75), 2)) == 3          # cumsum 1/4 <= 1/4: removed
    assert len(kept(dict(do_sample=True, top_p=0.5), 2)) == 2
    assert len(kept(dict(do_sample=True, top_p=0.25), 2)) == 1
    assert len(kept(dict(do_sample=True, top_p=0.75), 5)) == 6          # 2/8 <= 1/4
    assert kept(dict(do_sample=True, min_p=1.0), 6) == [9, 10]
    # min_p after temperature: p(1)/p(max) = e^-1 = 0.37 at T=1 (kept at min_p=0.3), e^-2 at T=0.5 (dropped)
    assert 0 in kept(dict(do_sample=True, min_p=0.3), 6)
    assert 0 not in kept(dict(do_sample=True, min_p=0.3, temperature=0.5), 6)


@pytest.mark.parametrize("kwargs", [dict(do_sample=False), dict(do_sample=False, repetition_penalty=1.4),
                                    dict(do_sample=False, repetition_penalty=0.5, min_new_tokens=5),
                                    dict(do_sample=False, top_k=3, top_p=0.1, temperature=0.3)], ids=str)
def test_greedy_matches_hf_first_max_index(hf_model, kwargs):
    logits, input_ids = crafted_case()
    theirs, do_sample = hf_process(hf_model, logits, input_ids, kPromptLen, kwargs)
    assert not do_sample
    params, min_new = fi_params(kwargs, kPromptLen)
    assert params.greedy
    seen, outs, suppress = fi_lists(input_ids, kPromptLen, min_new)
    n = logits.shape[0]
    ours = process_logits(logits, [params] * n, seen, outs, suppress)
    assert_same_kept_and_probs(ours, theirs)
    tokens = sample(logits, [params] * n, seen, outs, suppress)
    assert tokens.tolist() == torch.argmax(theirs, dim=-1).tolist()
    # ties: HF's argmax takes the first maximal index
    assert tokens[0] == 0 or kwargs.get("repetition_penalty")
    # greedy rows inside a batch of sampling rows pick the same
    mixed = [params if i % 2 == 0 else SamplingParams(temperature=0.8, top_k=2) for i in range(n)]
    mixed_tokens = sample(logits, mixed, seen, outs, suppress)
    assert mixed_tokens[::2].tolist() == tokens[::2].tolist()


def test_single_finite_entry_survives_every_warper():
    ninf = -kInf
    row = torch.full((1, 10), ninf)
    row[0, 7] = -3.0
    for params in [SamplingParams(), SamplingParams(temperature=0.3, top_k=2, top_p=0.1, min_p=0.9),
                   SamplingParams(repetition_penalty=0.5, presence_penalty=-2.0, frequency_penalty=-2.0,
                                  top_p=0.5, min_p=1.0), SamplingParams(temperature=0.0)]:
        out = process_logits(row, [params], [[7, 3]], [[7, 7, 3]])
        assert (~torch.isinf(out[0])).nonzero().flatten().tolist() == [7]
        tokens = sample(row.expand(256, -1).contiguous(), [params] * 256, [[7]] * 256, [[7]] * 256)
        assert (tokens == 7).all()


# ----------------------------------------------------------------------------- OpenAI / vLLM penalties

def test_presence_frequency_openai_semantics_with_repetition_first():
    """vLLM apply_penalties: repetition (prompt + output, HF rule) first, then
    logit -= frequency * count(output) + presence * [count(output) > 0]; prompt-only ids get neither."""
    logits = torch.tensor([[1.0, 2.0, -1.0, 0.5, -kInf, 3.0, 0.0]])
    prompt, output = [0, 0, 5, 99], [1, 1, 1, 2, 4, 123456]
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    out = process_logits(logits, [params], [prompt + output], [output])[0].tolist()
    expected = [1.0 / 2,                      # prompt only: repetition only
                2.0 / 2 - 3 * 0.25 - 0.5,     # output x3
                -1.0 * 2 - 0.25 - 0.5,        # output x1, negative logit multiplied
                0.5,                          # unseen
                -kInf,                        # stays -inf
                3.0 / 2,                      # prompt only
                0.0]
    assert out == expected
    # negative penalties (allowed in [-2, 0)) reward repeats, by count
    params = SamplingParams(presence_penalty=-1.0, frequency_penalty=-0.5)
    out = process_logits(torch.zeros(1, 3), [params], [[0, 1, 1]], [[1, 1]])[0].tolist()
    assert out == [0.0, 2.0, 0.0]


# ----------------------------------------------------------------------------- seeds

kSeedVocab = 64


def seeded_run(seed, others, position, steps=12):
    """Tokens of a seeded row (fresh generator, `steps` calls) placed at `position` among `others`
    (list of (params, logits_row, generator-factory or None))."""
    gen = torch.Generator().manual_seed(99)
    mine_logits = torch.randn(kSeedVocab, generator=gen)
    mine = SamplingParams(temperature=0.9, top_p=0.95, min_p=0.01, seed=seed)
    generator = make_generator(seed, "cpu")
    other_gens = [None if f is None else f() for _, _, f in others]
    torch.manual_seed(1000 + position + len(others))
    tokens = []
    for _ in range(steps):
        rows = [(p, l, g) for (p, l, _), g in zip(others, other_gens)]
        rows.insert(position, (mine, mine_logits, generator))
        logits = torch.stack([l for _, l, _ in rows])
        n = len(rows)
        seen = [[1, 2, 3]] * n
        outs = [[4, 4]] * n
        suppress = [[] for _ in range(n)]
        suppress[(position + 1) % n] = [0, 1]  # another row's suppression must not leak
        tokens.append(int(sample(logits, [p for p, _, _ in rows], seen, outs, suppress,
                                 [g for _, _, g in rows])[position]))
    return tokens


def test_seeded_row_independent_of_batch_composition():
    gen = torch.Generator().manual_seed(5)
    rand = lambda: torch.randn(kSeedVocab, generator=gen) * 2  # noqa: E731
    others = [
        (SamplingParams(temperature=0.0), rand(), None),
        (SamplingParams(top_k=40, repetition_penalty=1.3), rand(), None),
        (SamplingParams(top_k=3, seed=7), rand(), lambda: make_generator(7, "cpu")),
        (SamplingParams(presence_penalty=1.0, frequency_penalty=0.5, temperature=1.7), rand(), None),
        (SamplingParams(top_k=1), rand(), None),
        (SamplingParams(seed=42), rand(), lambda: make_generator(42, "cpu")),  # same seed, other row
    ]
    alone = seeded_run(42, [], 0)
    assert len(set(alone)) > 3
    for position, subset in [(0, others), (3, others), (6, others), (1, others[:2]), (0, others[4:5]),
                             (2, others[1:3]), (1, list(reversed(others)))]:
        assert seeded_run(42, subset, position) == alone, (position, len(subset))
    assert seeded_run(43, others, 2) != alone


def test_unseeded_rows_draw_independently():
    logits = torch.zeros(16, 1000)
    params = [SamplingParams()] * 16
    empty = [[] for _ in range(16)]
    first = sample(logits, params, empty, empty).tolist()
    second = sample(logits, params, empty, empty).tolist()
    assert len(set(first)) >= 13 and len(set(second)) >= 13
    assert first != second
    # the same with seeded rows (and a greedy row) in the batch: unseeded rows still independent,
    # and different from the seeded rows' draws
    mixed = list(params)
    gens = [None] * 16
    mixed[0], gens[0] = SamplingParams(seed=3), make_generator(3, "cpu")
    mixed[1], gens[1] = SamplingParams(seed=3), make_generator(3, "cpu")
    mixed[2] = SamplingParams(temperature=0.0)
    tokens = sample(logits, mixed, empty, empty, None, gens).tolist()
    assert tokens[0] == tokens[1]  # same seed, same logits: same token
    assert tokens[2] == 0
    assert len(set(tokens[3:])) >= 10


# ----------------------------------------------------------------------------- chi-square

def adversarial_rows():
    ninf = -kInf
    peaked = torch.full((64,), -3.0)
    peaked[17] = 6.0
    peaked[40:48] = ninf
    ratio = torch.full((8,), ninf)
    ratio[2], ratio[5] = 0.0, -math.log(1000.0)  # p = 0.999 vs 0.001
    ties = torch.tensor([2.0, 1.0, 1.0, ninf, 1.0, 1.0, 0.0, 0.0, -1.0, ninf] * 4)
    uniform8 = torch.tensor([ninf, 1.0, 1.0, ninf, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, ninf, ninf])
    gen = torch.Generator().manual_seed(11)
    heavy = torch.randn(256, generator=gen) * 4
    heavy[::7] = ninf
    minp = torch.tensor([3.0, 2.2, 2.0, 1.0, 0.0, -kInf, 2.9, 2.95])
    return {"peaked": peaked, "ratio": ratio, "ties": ties, "uniform8": uniform8, "heavy": heavy, "minp": minp}


CHI_CASES = [
    ("peaked", dict(do_sample=True, top_k=0)),
    ("peaked", dict(do_sample=True, temperature=3.0, top_p=0.9)),
    ("ratio", dict(do_sample=True)),
    ("ties", dict(do_sample=True, top_k=2, temperature=0.7)),        # ties at the top-k boundary
    ("ties", dict(do_sample=True, top_p=0.6, repetition_penalty=0.5)),
    ("uniform8", dict(do_sample=True, top_p=0.75)),                  # cumsum == threshold
    ("heavy", dict(do_sample=True, top_k=100, top_p=0.97, temperature=1.3)),
    ("minp", dict(do_sample=True, min_p=0.5, temperature=0.5)),      # min_p after temperature
    ("minp", dict(do_sample=True, min_p=0.5, temperature=2.0)),
]


@pytest.mark.parametrize("name,kwargs", CHI_CASES, ids=str)
def test_draws_follow_hf_processed_distribution(hf_model, name, kwargs):
    row = adversarial_rows()[name]
    input_ids = torch.tensor([[1, 4, 5, 6, 4]])
    theirs, _ = hf_process(hf_model, row[None], input_ids, kPromptLen, kwargs)
    expected = theirs[0].double().softmax(-1)
    params, min_new = fi_params(kwargs, kPromptLen)
    seen, outs, suppress = fi_lists(input_ids, kPromptLen, min_new)
    torch.manual_seed(2024)
    batch = row.expand(kDraws, -1).contiguous()
    tokens = sample(batch, [params] * kDraws, seen * kDraws, outs * kDraws, suppress * kDraws)
    counts = torch.bincount(tokens, minlength=row.shape[0]).double()
    assert counts[expected == 0].sum() == 0, "a token HF masks was drawn"
    assert ref.chi_square_pvalue(counts, expected) > kMinPValue


def test_seeded_draws_follow_distribution_on_skewed_row():
    row = adversarial_rows()["ratio"]
    params = SamplingParams(temperature=1.0)
    expected = row.double().softmax(-1)
    gens = [make_generator(s, "cpu") for s in range(kDraws)]
    tokens = sample(row.expand(kDraws, -1).contiguous(), [params] * kDraws, [[]] * kDraws, [[]] * kDraws,
                    None, gens)
    counts = torch.bincount(tokens, minlength=row.shape[0]).double()
    assert counts[expected == 0].sum() == 0
    assert ref.chi_square_pvalue(counts, expected) > kMinPValue


# ----------------------------------------------------------------------------- divergences

@pytest.mark.parametrize("key,model_defaults", [
    ("top_k", {}),                        # transformers' global default top_k=50
    ("top_k", {"top_k": 20}),
    ("temperature", {"temperature": 0.6}),
    ("top_p", {"top_p": 0.8}),
    ("min_p", {"min_p": 0.2}),
    ("repetition_penalty", {"repetition_penalty": 1.5}),
], ids=str)
def test_explicit_none_keyword_disables_processor_like_hf(hf_model, key, model_defaults):
    """HF 5.x: generate(top_k=None) etc. sets the field to None (generation_config.update(**kwargs)),
    so the processor is not built, whatever the model's or the global default."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 100, generator=gen) * 3
    input_ids = torch.tensor([[1, 4, 5, 6, 4]] * 2)
    kwargs = {"do_sample": True, key: None}
    processors, _ = hf_processors(hf_model, model_defaults, kwargs, kPromptLen)
    assert all(type(p).__name__ != {"top_k": "TopKLogitsWarper", "temperature": "TemperatureLogitsWarper",
                                    "top_p": "TopPLogitsWarper", "min_p": "MinPLogitsWarper",
                                    "repetition_penalty": "RepetitionPenaltyLogitsProcessor"}[key]
               for p in processors)
    theirs, _ = hf_process(hf_model, logits, input_ids, kPromptLen, kwargs, model_defaults)
    ours, _ = fi_process(logits, input_ids, kPromptLen, kwargs, model_defaults)
    assert_same_kept_and_probs(ours, theirs)


def test_top_p_zero_is_accepted_like_hf(hf_model):
    """HF accepts generate(do_sample=True, top_p=0.0): TopPLogitsWarper keeps exactly one token
    (min_tokens_to_keep). fastinfer's resolve() raises (SamplingParams wants top_p in (0, 1])."""
    logits, input_ids = crafted_case()
    kwargs = dict(do_sample=True, top_p=0.0)
    theirs, _ = hf_process(hf_model, logits, input_ids, kPromptLen, kwargs)
    assert ((~torch.isinf(theirs)).sum(-1) == 1).all()
    ours, _ = fi_process(logits, input_ids, kPromptLen, kwargs)
    assert_same_kept_and_probs(ours, theirs)


@pytest.mark.parametrize("kwargs", [dict(do_sample=True, top_k=1), dict(do_sample=True, temperature=1e-6)],
                         ids=str)
def test_sampling_rows_that_look_greedy_match_hf_kept_set(hf_model, kwargs):
    """HF's top_k=1 (or a tiny temperature) with do_sample=True still runs the warpers: top-k keeps
    every tied maximum (and top_k=50 by default masks the tail). fastinfer turns such rows into
    greedy rows (SamplingParams.greedy) and process_logits returns them unwarped."""
    logits, input_ids = crafted_case()
    theirs, _ = hf_process(hf_model, logits, input_ids, kPromptLen, kwargs)
    ours, _ = fi_process(logits, input_ids, kPromptLen, kwargs)
    assert_same_kept_and_probs(ours, theirs)


@pytest.mark.parametrize("kwargs", [dict(do_sample=True, top_k=1), dict(do_sample=True, temperature=1e-6)],
                         ids=str)
def test_sampling_rows_that_look_greedy_sample_tied_maxima_like_hf(hf_model, kwargs):
    """Tied maxima (common with bf16 logits): HF samples them uniformly; fastinfer always the first."""
    row = torch.tensor([[2.0, 0.0, 2.0, 1.0, 2.0]])
    input_ids = torch.tensor([[1, 4, 3]])
    theirs, _ = hf_process(hf_model, row, input_ids, kPromptLen, kwargs)
    expected = theirs[0].double().softmax(-1)
    assert expected.tolist() == pytest.approx([1 / 3, 0, 1 / 3, 0, 1 / 3])
    params, _ = fi_params(kwargs, kPromptLen)
    draws = 3000
    torch.manual_seed(0)
    tokens = sample(row.expand(draws, -1).contiguous(), [params] * draws, [[]] * draws, [[]] * draws)
    counts = torch.bincount(tokens, minlength=5).double()
    assert ref.chi_square_pvalue(counts, expected) > kMinPValue, counts.tolist()
