"""Review of the serving engine and the LLM batch API from a vLLM user's point of view.

Project rules checked here: bad input gets a ValueError naming the field before any kernel runs;
one bad request never takes down the others; nothing submitted is silently lost; greedy output is
identical to HF transformers. Tiny random models on the CPU (tests/models.py).
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from fastinfer.engine import Engine, EngineConfig
from fastinfer.generate import get_loaded
from fastinfer.llm import LLM
from fastinfer.sampling_params import SamplingParams
from models import make_hf_model
from test_engine import make_prompts, run_alone

pytest.importorskip("transformers")
GREEDY = dict(temperature=0.0, ignore_eos=True)
VOCAB = 320  # models.SMALL


@pytest.fixture(scope="module")
def hf():
    return make_hf_model("llama", seed=11)


@pytest.fixture(scope="module")
def loaded(hf):
    return get_loaded(hf)


class CharTokenizer:
    """One lowercase letter per token id (id % 26): deterministic, fast, and every token adds exactly
    one character, so a stop string of two letters spans two tokens."""
    ALPHA = "abcdefghijklmnopqrstuvwxyz"

    def __call__(self, text):
        return {"input_ids": [3 + self.ALPHA.index(c) for c in text]}

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False):
        return "".join(self.ALPHA[i % 26] for i in ids)


@pytest.fixture(scope="module")
def with_tok(loaded):
    return dataclasses.replace(loaded, tokenizer=CharTokenizer())


def drain(engine: Engine) -> dict:
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = engine.pop_finished(out.request_id)
        engine.blocks.check_invariants()
    return done


# ================================================================================================
# Failing tests: bugs
# ================================================================================================

def test_fork_without_a_free_block_does_not_crash_the_engine(loaded):
    """n > 1: after the prefill each child needs a fresh block for its copy of the partial last
    block; the scheduler reserved blocks for the parent only. With the pool full, BlockManager.fork
    -> _take_block pops an empty OrderedDict: KeyError mid-step, every request in the engine dies."""
    prompt = make_prompts(1, seed=8, lo=40, hi=40)[0]  # 2.5 blocks
    expected = run_alone(loaded, prompt, 5)
    engine = Engine(loaded, EngineConfig(num_blocks=4, enable_prefix_caching=False))
    # validate() accepts it: one sequence needs 3 of the 4 blocks
    engine.add_request("n4", prompt, SamplingParams(n=4, max_tokens=5, **GREEDY))
    engine.add_request("other", [5, 6, 7], SamplingParams(max_tokens=5, **GREEDY))
    done = drain(engine)
    assert [c.token_ids for c in done["n4"].outputs] == [expected] * 4
    assert len(done["other"].outputs[0].token_ids) == 5
    assert engine.blocks.num_in_use == 0


def test_cached_prefix_does_not_block_admission(loaded):
    """Scheduler admission asks can_allocate(seq, min(len(seq), budget)) and can_allocate adds the
    cached prefix on top: hits * block_size + len(seq) counts the cached tokens twice. A prompt whose
    blocks are mostly in the prefix cache then 'needs' more blocks than the pool has although it
    fits (it just ran alone): with nothing else running, step() raises RuntimeError('KV pool too
    small') and the engine is wedged (has_unfinished() stays True for good)."""
    prompt = make_prompts(1, seed=50, lo=64, hi=64)[0]  # 4 full blocks; + 4 tokens = 5 blocks
    llm = LLM(loaded, num_blocks=5)
    params = SamplingParams(max_tokens=4, **GREEDY)
    first = llm.generate([prompt], params, use_tqdm=False)[0]
    assert llm.engine.blocks.num_cached == 4
    second = llm.generate([prompt], params, use_tqdm=False)[0]  # RuntimeError today
    assert second.outputs[0].token_ids == first.outputs[0].token_ids and second.num_cached_tokens == 48
    assert not llm.engine.has_unfinished()


def test_llm_stops_on_the_generation_config_eos_like_hf():
    """Engine.eos_ids comes from config.json's eos_token_id only; the checkpoint's generation_config
    eos ids (Llama-3-Instruct's <|eot_id|>, kept in LoadedModel.generation_defaults) are ignored, so
    LLM.generate runs past them to max_tokens while HF generate and fastinfer.generate stop."""
    import fastinfer
    hf = make_hf_model("llama", seed=11)  # its own object: the module's `hf` stays untouched
    prompt = [5, 6, 7]
    ids = torch.tensor([prompt])
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12, pad_token_id=0)
    with torch.no_grad():
        free = hf.generate(ids, eos_token_id=None, **kw)[0, 3:].tolist()
        hf.generation_config.eos_token_id = [hf.config.eos_token_id, free[4]]
        expected = hf.generate(ids, **kw)[0, 3:].tolist()
    assert expected == free[:5]
    assert fastinfer.generate(hf, ids, **kw)[0, 3:].tolist() == expected
    out = LLM(hf, num_blocks=16).generate([prompt], SamplingParams(temperature=0.0, max_tokens=12),
                                          use_tqdm=False)[0].outputs[0]
    assert (out.token_ids, out.finish_reason) == (expected, "stop")


def test_logprobs_above_vocab_rejected_at_add_request(loaded):
    """logprobs has no upper bound: torch.topk(k > vocab) raises RuntimeError inside step(), after the
    forward, and takes the good request of the same batch down with it."""
    engine = Engine(loaded, EngineConfig(num_blocks=16))
    engine.add_request("good", [5, 6, 7], SamplingParams(max_tokens=3, **GREEDY))
    with pytest.raises(ValueError, match="logprobs"):
        engine.add_request("bad", [5, 6, 7], SamplingParams(max_tokens=3, logprobs=VOCAB + 1, **GREEDY))
    done = drain(engine)
    assert len(done["good"].outputs[0].token_ids) == 3


def test_generate_min_tokens_with_default_max_tokens_fails_up_front(loaded):
    """LLM._requests pre-validates with a fresh SamplingParams(max_tokens=...) that drops min_tokens;
    the real replace() in Engine.add_request then raises for prompts[1] *after* prompts[0] was
    submitted: prompts[0] is orphaned in the engine (run by the next generate, never popped)."""
    llm = LLM(loaded, num_blocks=64)
    long_prompt = [5] * (llm.engine.max_model_len - 7)  # leaves max_tokens = 7 < min_tokens
    params = SamplingParams(max_tokens=None, min_tokens=20, **GREEDY)
    with pytest.raises(ValueError, match="min_tokens") as err:
        llm.generate([[5, 6, 7], long_prompt], params, use_tqdm=False)
    assert not llm.engine.has_unfinished() and not llm.engine.requests, "prompts[0] was left queued"
    assert "prompts[1]" in str(err.value)
    llm.generate([[8, 9]], SamplingParams(max_tokens=2, **GREEDY), use_tqdm=False)
    assert not llm.engine.requests, "requests of the failed call leaked into the engine"


def test_generate_speculative_logprobs_fails_up_front(loaded):
    """The speculative + logprobs check lives only in Engine.add_request, not in LLM._requests: the
    ValueError comes mid-submit (without the prompt index) and the earlier prompts stay queued."""
    llm = LLM(loaded, num_blocks=64, speculative={"method": "ngram", "num_tokens": 2})
    params = [SamplingParams(max_tokens=3, **GREEDY), SamplingParams(max_tokens=3, logprobs=1, **GREEDY)]
    with pytest.raises(ValueError, match="logprobs") as err:
        llm.generate([[5, 6, 7], [5, 6, 7]], params, use_tqdm=False)
    assert not llm.engine.has_unfinished() and not llm.engine.requests, "prompts[0] was left queued"
    assert "prompts[1]" in str(err.value)


def test_tiny_temperature_is_not_silently_garbage(loaded):
    """temperature=1e-40 passes validation; logits / 1e-40 overflow to inf, softmax gives NaN and
    argmax returns token 0 at every step. Either reject it (ValueError naming temperature) or treat
    it as greedy (vLLM: below 1e-5 is greedy)."""
    try:
        params = SamplingParams(max_tokens=6, temperature=1e-40, seed=0, ignore_eos=True)
    except ValueError as e:
        assert "temperature" in str(e)
        return
    llm = LLM(loaded, num_blocks=16)
    out = llm.generate([[5, 6, 7]], params, use_tqdm=False)[0].outputs[0].token_ids
    assert out == run_alone(loaded, [5, 6, 7], 6)


def test_stream_deltas_add_up_when_a_stop_string_spans_tokens(with_tok):
    """The stream yields each token's text at once; when the next token completes a stop string,
    Engine._check_stop cuts seq.text *before* the already-streamed first half, so the deltas add up
    to more than the final text (vLLM holds back len(stop) - 1 characters while streaming)."""
    llm = LLM(with_tok, num_blocks=64)
    free = llm.generate(["hello"], SamplingParams(max_tokens=12, **GREEDY), use_tqdm=False)[0].outputs[0]
    stop = free.text[4:6]
    assert free.text.find(stop) == 4
    params = SamplingParams(max_tokens=12, stop=[stop], **GREEDY)
    final = llm.generate(["hello"], params, use_tqdm=False)[0].outputs[0]
    assert final.text == free.text[:4] and final.finish_reason == "stop" and final.stop_reason == stop
    streamed = "".join(d.text for d in llm.stream(["hello"], params))
    assert streamed == final.text


def test_closing_a_stream_early_releases_its_requests(with_tok):
    """Breaking out of LLM.stream (client disconnect) leaves its requests running in the engine: the
    next generate() runs them to completion too and never pops them (engine.requests leaks)."""
    llm = LLM(with_tok, num_blocks=64)
    stream = llm.stream(["hello", "world"], SamplingParams(max_tokens=12, **GREEDY))
    next(stream)
    stream.close()
    assert not llm.engine.has_unfinished()
    llm.generate(["abc"], SamplingParams(max_tokens=2, **GREEDY), use_tqdm=False)
    assert not llm.engine.requests


def test_num_cached_tokens_counts_prompt_tokens_only(loaded):
    """BlockManager.allocate overwrites seq.num_prefix_hit_tokens on every admission, so after a
    preemption the recompute's hits on the sequence's own output blocks are reported as
    RequestOutput.num_cached_tokens ('prompt tokens served from the prefix cache'): it can exceed the
    prompt's length."""
    prompts = make_prompts(8, seed=30, lo=4, hi=10)
    engine = Engine(loaded, EngineConfig(num_blocks=8, max_num_seqs=8))
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(max_tokens=40, **GREEDY))
    done = drain(engine)
    assert engine.scheduler.num_preemptions > 0
    for out in done.values():
        assert out.num_cached_tokens <= len(out.prompt_token_ids), (out.request_id, out.num_cached_tokens)


def test_stop_strings_without_a_tokenizer_are_rejected(loaded):
    """A model without a tokenizer produces no text, so stop strings can never match: they are
    silently ignored (text prompts, by contrast, get a clear ValueError)."""
    llm = LLM(loaded, num_blocks=16)
    assert llm.tokenizer is None
    with pytest.raises(ValueError, match="stop"):
        llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4, stop=["x"], **GREEDY), use_tqdm=False)


@pytest.mark.parametrize("prompts, match", [
    ([[5, 6], None], r"prompts\[1\]"),
    ([[5, 6], 7.5], r"prompts\[1\]"),
    (42, "prompt"),
])
def test_prompt_of_wrong_type_gets_value_error(loaded, prompts, match):
    """Engine.tokenize does list(prompt) for any non-str: None / a float / an int raise TypeError
    ('object is not iterable') instead of a ValueError naming the prompt."""
    llm = LLM(loaded, num_blocks=16)
    with pytest.raises(ValueError, match=match):
        llm.generate(prompts, SamplingParams(max_tokens=2, **GREEDY), use_tqdm=False)
    assert not llm.engine.has_unfinished()


def test_engine_add_request_rejects_non_sampling_params(loaded):
    engine = Engine(loaded, EngineConfig(num_blocks=16))
    with pytest.raises(ValueError, match="SamplingParams"):
        engine.add_request("d", [5, 6], {"temperature": 0.0})  # AttributeError today
    assert not engine.requests


def test_pop_finished_of_a_running_request_does_not_break_the_engine(loaded):
    """pop_finished never checks that the request finished: it removes a running n > 1 request
    whose sequences stay scheduled, and the next step() dies with KeyError in _expand_forks
    (self.requests[seq.request_id]), taking the other request down."""
    engine = Engine(loaded, EngineConfig(num_blocks=64))
    engine.add_request("a", [5, 6, 7], SamplingParams(max_tokens=3, **GREEDY))
    engine.add_request("r", [5, 6, 7], SamplingParams(n=2, max_tokens=3, **GREEDY))
    with pytest.raises(ValueError, match="finished"):
        engine.pop_finished("r")
    done = drain(engine)
    assert len(done["a"].outputs[0].token_ids) == 3 and set(done) == {"a", "r"}


def test_max_num_seqs_bounds_forked_siblings(loaded):
    """_expand_forks appends the n - 1 children to scheduler.running without looking at
    max_num_seqs: with max_num_seqs=1 and n=3, three sequences run in one batch."""
    engine = Engine(loaded, EngineConfig(num_blocks=64, max_num_seqs=1))
    engine.add_request("r", [5, 6, 7], SamplingParams(n=3, max_tokens=4, **GREEDY))
    most = 0
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                assert [c.token_ids for c in engine.pop_finished(out.request_id).outputs] == \
                    [run_alone(loaded, [5, 6, 7], 4)] * 3
        most = max(most, len(engine.scheduler.running))
    assert most <= 1


@pytest.mark.parametrize("max_model_len", [-5, 0])
def test_non_positive_max_model_len_rejected_at_construction(loaded, max_model_len):
    """-5 is accepted (every request then fails against max_model_len=-5); 0 silently means the
    model's length (`config.max_model_len or cfg.max_model_len`)."""
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(loaded, num_blocks=8, max_model_len=max_model_len)


# ================================================================================================
# Passing tests: coverage not in the existing files
# ================================================================================================

@pytest.mark.parametrize("prefix_caching", [False, True])
def test_parallel_siblings_under_preemption_match_single(loaded, prefix_caching):
    """n = 3 greedy siblings sharing prompt blocks, preempted and recomputed, all equal the lone run."""
    prompts = make_prompts(4, seed=3, lo=10, hi=30)
    alone = [run_alone(loaded, p, 24) for p in prompts]
    engine = Engine(loaded, EngineConfig(num_blocks=16, max_num_seqs=8, max_num_batched_tokens=64,
                                         enable_prefix_caching=prefix_caching))
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(n=3, max_tokens=24, **GREEDY))
    done = drain(engine)
    assert engine.scheduler.num_preemptions > 0
    for i in range(4):
        assert [c.index for c in done[str(i)].outputs] == [0, 1, 2]
        assert all(c.token_ids == alone[i] and c.finish_reason == "length" for c in done[str(i)].outputs)
    assert engine.blocks.num_in_use == 0


def test_duplicate_request_id_rejected_and_reusable_after_pop(loaded):
    engine = Engine(loaded, EngineConfig(num_blocks=16))
    engine.add_request("x", [5, 6, 7], SamplingParams(max_tokens=3, **GREEDY))
    engine.step()
    with pytest.raises(ValueError, match="request_id 'x'"):
        engine.add_request("x", [8, 9], SamplingParams(max_tokens=3, **GREEDY))
    done = drain(engine)
    assert done["x"].prompt_token_ids == [5, 6, 7] and len(done["x"].outputs[0].token_ids) == 3
    engine.add_request("x", [8, 9], SamplingParams(max_tokens=2, **GREEDY))
    assert drain(engine)["x"].outputs[0].token_ids == run_alone(loaded, [8, 9], 2)


def test_abort_unknown_finished_and_waiting_requests(loaded):
    engine = Engine(loaded, EngineConfig(num_blocks=16, max_num_seqs=1))
    engine.abort("never-added")  # no-op
    engine.add_request("a", [5, 6, 7], SamplingParams(max_tokens=3, **GREEDY))
    engine.add_request("w", [8, 9], SamplingParams(n=2, max_tokens=3, **GREEDY))
    engine.step()  # max_num_seqs=1: "w" still waits
    assert engine.scheduler.waiting and engine.scheduler.waiting[0].request_id == "w"
    engine.abort("w")
    done = drain(engine)
    assert set(done) == {"a"} and done["a"].outputs[0].token_ids == run_alone(loaded, [5, 6, 7], 3)
    engine.abort("a")  # already popped: no-op
    out = engine.pop_finished("w")
    assert out.finished and [(c.finish_reason, c.token_ids) for c in out.outputs] == [("abort", [])]
    assert engine.blocks.num_in_use == 0 and not engine.requests


def test_identical_prompts_in_one_batch_with_prefix_caching(loaded):
    """Identical prompts admitted together and later ones hitting the cache under chunked prefill
    all give the lone greedy result."""
    prompt = make_prompts(1, seed=40, lo=50, hi=50)[0]
    expected = run_alone(loaded, prompt, 6)
    engine = Engine(loaded, EngineConfig(num_blocks=40, max_num_seqs=4, max_num_batched_tokens=32))
    for i in range(8):
        engine.add_request(str(i), prompt, SamplingParams(max_tokens=6, **GREEDY))
    done = drain(engine)
    assert all(done[str(i)].outputs[0].token_ids == expected for i in range(8))
    assert engine.blocks.prefix_hit_rate > 0 and engine.blocks.num_in_use == 0
    assert max(o.num_cached_tokens for o in done.values()) == 48  # 3 full blocks; the last token recomputed


def test_max_num_seqs_one_runs_requests_serially(loaded):
    prompts = make_prompts(4, seed=41, lo=3, hi=20)
    llm = LLM(loaded, num_blocks=16, max_num_seqs=1)
    outs = llm.generate(prompts, SamplingParams(max_tokens=5, **GREEDY), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [run_alone(loaded, p, 5) for p in prompts]


def test_engine_greedy_matches_hf_under_chunking_preemption_and_prefix_cache(hf, loaded):
    """LLM.generate vs HF generate token for token, through chunked prefill (16-token budget), a pool
    small enough to preempt, prefix-cache hits (a repeated prompt), repetition penalty, min_tokens
    and a stop token playing HF's eos."""
    prompts = make_prompts(5, seed=42, lo=5, hi=40)
    prompts.append(list(prompts[4]))

    def hf_new_tokens(prompt, **kw):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                              pad_token_id=0, **kw)
        return out[0, len(prompt):].tolist()

    stop = hf_new_tokens(prompts[0], eos_token_id=None)[4]
    kw = dict(eos_token_id=[stop], repetition_penalty=1.3, min_new_tokens=2)
    expected = [hf_new_tokens(p, **kw) for p in prompts]
    llm = LLM(loaded, num_blocks=6, max_num_seqs=6, max_num_batched_tokens=16)
    params = SamplingParams(temperature=0.0, max_tokens=12, min_tokens=2, repetition_penalty=1.3,
                            stop_token_ids=[stop], ignore_eos=True)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert llm.engine.scheduler.num_preemptions > 0
    assert got == expected
    assert any(len(t) < 12 for t in got), "the test wants a request that stopped on the stop token"


@pytest.mark.parametrize("field, value", [
    ("temperature", math.nan), ("temperature", math.inf), ("top_p", 1.5), ("top_p", math.nan),
    ("top_p", -0.1), ("top_k", -5), ("max_tokens", -1), ("n", -1), ("n", True), ("n", 2.0),
    ("seed", -1), ("seed", 2**64), ("seed", "1"), ("seed", 1.5), ("stop", [""]), ("stop", [1]),
    ("stop", b"x"), ("stop_token_ids", [-1]), ("stop_token_ids", "5"), ("logprobs", -1),
    ("repetition_penalty", 0.0), ("presence_penalty", 3.0), ("frequency_penalty", math.nan),
    ("min_tokens", -1), ("ignore_eos", 1),
])
def test_more_sampling_params_rejected_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_sampling_params_normalisation_and_unknown_fields():
    assert SamplingParams(stop="ab").stop == ["ab"]
    assert SamplingParams(stop=("a", "b"), stop_token_ids=(4, 5)).stop_token_ids == [4, 5]
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=5, max_tokens=4)
    with pytest.raises(TypeError):  # vLLM's best_of does not exist here: loud, not ignored
        SamplingParams(best_of=2)


@pytest.mark.parametrize("num_blocks, prompts, params, match", [
    (8, [[5, 6], [-1, 5]], None, r"prompts\[1\].*token id -1"),
    (8, [[5, 6], [5, 6.0]], None, r"prompts\[1\].*token id 6.0"),
    (64, [[5, 6], [5] * 512], SamplingParams(max_tokens=None), r"prompts\[1\].*max_model_len"),
    (64, [[5, 6], [5] * 100], SamplingParams(max_tokens=420), r"prompts\[1\].*max_model_len"),
    (8, [[5, 6], [5] * 100], SamplingParams(max_tokens=100), r"prompts\[1\].*KV blocks"),
    # max_tokens=None may run to max_model_len (32 blocks): rejected by a smaller pool, even for 2 tokens
    (8, [[5, 6]], SamplingParams(max_tokens=None), r"prompts\[0\].*KV blocks"),
    (8, [[5, 6], "text"], None, r"prompts\[1\].*tokenizer"),
    (8, [[5, 6]], ["not params"], r"prompts\[0\].*SamplingParams"),
])
def test_bad_prompt_in_a_batch_fails_before_any_work(loaded, num_blocks, prompts, params, match):
    llm = LLM(loaded, num_blocks=num_blocks)
    with pytest.raises(ValueError, match=match):
        llm.generate(prompts, params, use_tqdm=False)
    assert not llm.engine.has_unfinished() and not llm.engine.requests
    assert llm.engine.num_prompt_tokens == 0


def test_mixed_text_and_token_prompts_with_per_prompt_params(with_tok):
    llm = LLM(with_tok, num_blocks=64)
    tok = CharTokenizer()
    prompts = ["hello", tok("hello")["input_ids"], "abc"]
    params = [SamplingParams(max_tokens=5, **GREEDY), SamplingParams(max_tokens=5, **GREEDY),
              SamplingParams(max_tokens=3, **GREEDY)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.prompt for o in outs] == ["hello", None, "abc"]
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids
    assert outs[0].outputs[0].text == outs[1].outputs[0].text == tok.decode(outs[0].outputs[0].token_ids)
    assert len(outs[2].outputs[0].token_ids) == 3


def test_stop_string_spanning_tokens_truncates_text_but_not_before_min_tokens(with_tok):
    llm = LLM(with_tok, num_blocks=64)
    free = llm.generate(["hello"], SamplingParams(max_tokens=12, **GREEDY), use_tqdm=False)[0].outputs[0]
    stop = free.text[1:3]
    out = llm.generate(["hello"], SamplingParams(max_tokens=12, stop=stop, **GREEDY), use_tqdm=False)[0].outputs[0]
    assert (out.text, out.finish_reason, out.stop_reason, out.token_ids) == \
        (free.text[:1], "stop", stop, free.token_ids[:3])
    # min_tokens: the stop string is not looked for until min_tokens tokens exist
    late = llm.generate(["hello"], SamplingParams(max_tokens=12, min_tokens=4, stop=stop, **GREEDY),
                        use_tqdm=False)[0].outputs[0]
    assert late.token_ids == free.token_ids[:len(late.token_ids)] and len(late.token_ids) >= 4


def test_stream_of_parallel_completions_adds_up(with_tok):
    llm = LLM(with_tok, num_blocks=64)
    prompts = ["hello", "world"]
    params = SamplingParams(n=2, max_tokens=8, temperature=0.8, seed=7, ignore_eos=True)
    final = llm.generate(prompts, params, use_tqdm=False)
    texts, tokens, reasons = {}, {}, {}
    for d in llm.stream(prompts, params):
        key = (d.index, d.completion)
        texts[key] = texts.get(key, "") + d.text
        tokens[key] = tokens.get(key, []) + d.token_ids
        reasons[key] = d.finish_reason
    for i, o in enumerate(final):
        for c in o.outputs:
            assert (texts[i, c.index], tokens[i, c.index], reasons[i, c.index]) == \
                (c.text, c.token_ids, c.finish_reason)
    assert not llm.engine.requests
