"""SamplingParams(prompt_logprobs=k), as vLLM: RequestOutput.prompt_logprobs is [None, {...}, ...], one entry
per prompt token, each holding that token's Logprob (its logprob given the tokens before it, its rank among
the vocabulary with ties counted ahead) and the k most likely tokens' (ranks 1..k), the prompt token first.

Judged against HF transformers' own forward on the same random model (fp32 on the CPU): the log-softmax of
its logits at the previous position. Chunked prefill (the prompt split across steps), prefix caching (a
cached prefix must not leave positions without logits), n > 1, and batches mixing requests with and
without prompt logprobs (the others' tokens unchanged)."""
from __future__ import annotations

import pytest
import torch

from fastinfer.llm import LLM
from fastinfer.sampling_params import SamplingParams
from models import make_hf_model

pytest.importorskip("transformers")
PROMPT = [5, 17, 3, 99, 42, 8, 250, 31, 7, 64, 12, 5, 77, 190, 23, 23, 4, 88, 61, 2, 140, 9, 33]
GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    return make_hf_model("llama", seed=1)


def hf_logprobs(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)


def check_against_hf(model, ids, prompt_logprobs, k):
    ref = hf_logprobs(model, ids)
    assert len(prompt_logprobs) == len(ids) and prompt_logprobs[0] is None
    for p in range(1, len(ids)):
        entry, row = prompt_logprobs[p], ref[p - 1]
        assert list(entry)[0] == ids[p], "the prompt token comes first"
        lp = entry[ids[p]]
        assert lp.logprob == pytest.approx(row[ids[p]].item(), abs=1e-4)
        assert lp.rank == int((row >= row[ids[p]] - 1e-6).sum()) or lp.rank == int((row > row[ids[p]]).sum()) + 1
        top = torch.topk(row, k).indices.tolist() if k else []
        others = [t for t in entry if t != ids[p]]
        assert set(others) <= set(top) and len(entry) in (k, k + 1)
        ranked = sorted((v for t, v in entry.items() if t != ids[p] or ids[p] in top), key=lambda v: v.rank)
        assert [v.rank for v in ranked] == list(range(1, k + 1))
        assert all(a.logprob >= b.logprob for a, b in zip(ranked, ranked[1:]))


@pytest.mark.parametrize("chunk", [4, 7, 64], ids=["chunk4", "chunk7", "whole"])
@pytest.mark.parametrize("k", [0, 3])
def test_prompt_logprobs_match_hf(model, chunk, k):
    llm = LLM(model, kv_cache_memory_bytes=8 << 20, max_num_batched_tokens=chunk, enable_prefix_caching=False)
    out = llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(max_tokens=3, prompt_logprobs=k, **GREEDY),
                       use_tqdm=False)[0]
    check_against_hf(model, PROMPT, out.prompt_logprobs, k)
    plain = llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(max_tokens=3, **GREEDY), use_tqdm=False)[0]
    assert plain.prompt_logprobs is None and plain.outputs[0].token_ids == out.outputs[0].token_ids


def test_cached_prefix_is_computed_again_for_prompt_logprobs(model):
    """A prompt whose first blocks are in the prefix cache still gets every position's logprob: such a
    request takes no hits (num_cached_tokens 0); without prompt_logprobs the same prompt does hit."""
    llm = LLM(model, kv_cache_memory_bytes=8 << 20, block_size=4)
    llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(max_tokens=2, **GREEDY), use_tqdm=False)
    other = PROMPT[:12] + [1, 2, 3, 4, 5]
    out = llm.generate({"prompt_token_ids": other}, SamplingParams(max_tokens=2, prompt_logprobs=1, **GREEDY),
                       use_tqdm=False)[0]
    assert out.num_cached_tokens == 0
    check_against_hf(model, other, out.prompt_logprobs, 1)
    again = llm.generate({"prompt_token_ids": other}, SamplingParams(max_tokens=2, **GREEDY), use_tqdm=False)[0]
    assert again.num_cached_tokens > 0 and again.outputs[0].token_ids == out.outputs[0].token_ids


def test_n_completions_and_mixed_batches(model):
    """n = 2 shares one prompt_logprobs list; requests without prompt_logprobs in the same batch generate
    what they generate alone."""
    llm = LLM(model, kv_cache_memory_bytes=8 << 20, max_num_batched_tokens=16)
    short = [9, 8, 7, 6, 5]
    alone = llm.generate({"prompt_token_ids": short}, SamplingParams(max_tokens=5, **GREEDY), use_tqdm=False)[0]
    outs = llm.generate([{"prompt_token_ids": PROMPT}, {"prompt_token_ids": short}],
                        [SamplingParams(max_tokens=4, n=2, seed=1, temperature=1.0, prompt_logprobs=2),
                         SamplingParams(max_tokens=5, **GREEDY)], use_tqdm=False)
    assert len(outs[0].outputs) == 2
    check_against_hf(model, PROMPT, outs[0].prompt_logprobs, 2)
    assert outs[1].prompt_logprobs is None and outs[1].outputs[0].token_ids == alone.outputs[0].token_ids


def test_single_token_prompt_and_validation(model):
    llm = LLM(model, kv_cache_memory_bytes=8 << 20)
    out = llm.generate({"prompt_token_ids": [42]}, SamplingParams(max_tokens=2, prompt_logprobs=5, **GREEDY),
                       use_tqdm=False)[0]
    assert out.prompt_logprobs == [None]
    with pytest.raises(ValueError, match="prompt_logprobs must be an int >= 0"):
        SamplingParams(prompt_logprobs=-1)
    with pytest.raises(ValueError, match="prompt_logprobs must be <= the vocabulary size"):
        llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(prompt_logprobs=10 ** 6), use_tqdm=False)


@pytest.mark.cuda
def test_prompt_logprobs_on_the_gpu():
    """bf16 on the GPU against HF's fp32 CPU forward: every position's logprob within 0.05, the same top-1
    (unless HF's top two are within 0.02). head_dim 64: the CUDA attention kernels take 64 and 128."""
    model = make_hf_model("llama", seed=1, head_dim=64, hidden_size=256, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=512)
    llm = LLM(model, dtype=torch.bfloat16, device="cuda", kv_cache_memory_bytes=64 << 20, max_num_batched_tokens=8)
    out = llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(max_tokens=2, prompt_logprobs=1, **GREEDY),
                       use_tqdm=False)[0]
    ref = hf_logprobs(model, PROMPT)
    for p in range(1, len(PROMPT)):
        entry = out.prompt_logprobs[p]
        assert abs(entry[PROMPT[p]].logprob - ref[p - 1, PROMPT[p]].item()) < 0.05
        top1 = [t for t, v in entry.items() if v.rank == 1]
        assert not top1 or top1[0] == int(ref[p - 1].argmax()) or ref[p - 1].topk(2).values.diff().abs().item() < 0.02


def test_all_row_logits_are_capped_per_step(model, monkeypatch):
    """Sequences computing prompt logprobs feed at most PROMPT_LOGPROBS_ROWS tokens per step between them
    (fp32 [tokens, vocab] logits): a long prompt is chunked further, the results unchanged."""
    from fastinfer import scheduler
    monkeypatch.setattr(scheduler, "PROMPT_LOGPROBS_ROWS", 5)
    llm = LLM(model, kv_cache_memory_bytes=8 << 20, enable_prefix_caching=False)
    seen = []
    real = llm.engine.runner.run
    llm.engine.runner.run = lambda chunks: seen.append(sum(len(c.token_ids) for c in chunks if c.all_logits)) \
        or real(chunks)
    outs = llm.generate([{"prompt_token_ids": PROMPT}, {"prompt_token_ids": PROMPT[::-1]}],
                        SamplingParams(max_tokens=2, prompt_logprobs=1, **GREEDY), use_tqdm=False)
    assert max(seen) == 5
    check_against_hf(model, PROMPT, outs[0].prompt_logprobs, 1)
    check_against_hf(model, PROMPT[::-1], outs[1].prompt_logprobs, 1)
