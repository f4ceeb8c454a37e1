"""LLM.beam_search (vLLM's offline beam search) against the same algorithm run on HF transformers' logits
(CPU, fp32): vLLM's candidate rule (each live beam's top 2 x beam_width tokens), its EOS handling and its
ranking by cum_logprob / len(prompt + generated) ** length_penalty."""
from __future__ import annotations

import pytest
import torch

import fastinfer
from fastinfer.generate import get_loaded
from fastinfer.llm import LLM
from fastinfer.vllm_beam_search import BeamSearchParams, beam_search_score
from models import make_hf_model

pytest.importorskip("transformers")


def reference(hf, prompt: list[int], params: BeamSearchParams, eos: int) -> list[tuple[list[int], float]]:
    """vLLM's algorithm on HF's log-softmaxed logits (greedy: the sampled token is the top one)."""
    def score(beam):
        return beam_search_score(beam[0], beam[1], eos, params.length_penalty)

    beams, completed = [(list(prompt), 0.0)], []
    for _ in range(params.max_tokens):
        candidates = []
        for tokens, cum in beams:
            with torch.no_grad():
                logprobs = torch.log_softmax(hf(torch.tensor([tokens])).logits[0, -1].double(), dim=-1)
            top = torch.topk(logprobs, 2 * params.beam_width)
            for token, logprob in zip(top.indices.tolist(), top.values.tolist()):
                beam = (tokens + [token], cum + logprob)
                (completed if token == eos and not params.ignore_eos else candidates).append(beam)
        beams = sorted(candidates, key=score, reverse=True)[:params.beam_width]
    return sorted(completed + beams, key=score, reverse=True)[:params.beam_width]


@pytest.mark.parametrize("kw", [dict(beam_width=3, max_tokens=8), dict(beam_width=4, max_tokens=6, length_penalty=0.5),
                                dict(beam_width=4, max_tokens=6, ignore_eos=True), dict(beam_width=1, max_tokens=5)],
                         ids=["w3", "w4-lp0.5", "w4-ignore-eos", "w1"])
def test_matches_the_algorithm_on_hf_logits(kw):
    hf = make_hf_model("llama", seed=3)
    eos = hf.config.eos_token_id
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 320, (n,), generator=gen).tolist() for n in (5, 17)]
    params = BeamSearchParams(**kw)
    llm = LLM(get_loaded(hf), num_blocks=64)
    outputs = llm.beam_search([{"prompt_token_ids": p} for p in prompts], params)
    assert len(outputs) == len(prompts)
    for prompt, out in zip(prompts, outputs):
        expected = reference(hf, prompt, params, eos)
        assert [s.tokens for s in out.sequences] == [tokens for tokens, _ in expected]
        for seq, (_, cum) in zip(out.sequences, expected):
            assert seq.cum_logprob == pytest.approx(cum, abs=1e-4)
            assert len(seq.logprobs) == len(seq.tokens) - len(prompt) and seq.text is None
            assert seq.tokens[:len(prompt)] == prompt


def test_eos_completes_beams():
    """With the model's most likely first token as EOS, that beam completes at once and still ranks."""
    hf = make_hf_model("llama", seed=4)
    prompt = [5, 9, 30, 41]
    with torch.no_grad():
        first = int(hf(torch.tensor([prompt])).logits[0, -1].argmax())
    hf.config.eos_token_id = first
    params = BeamSearchParams(beam_width=2, max_tokens=6)
    out = LLM(get_loaded(hf), num_blocks=32).beam_search([prompt], params)[0]
    expected = reference(hf, prompt, params, first)
    assert [s.tokens for s in out.sequences] == [t for t, _ in expected]
    # the one-token EOS beam (score logprob / len(prompt)) outranks the 6-token beams here
    assert out.sequences[0].tokens == prompt + [first] and len(out.sequences[1].tokens) == len(prompt) + 6


@pytest.mark.parametrize("kw, match", [
    (dict(beam_width=0, max_tokens=3), "beam_width"), (dict(beam_width=2, max_tokens=0), "max_tokens"),
    (dict(beam_width=2, max_tokens=3, temperature=-1.0), "temperature"),
    (dict(beam_width=2, max_tokens=3, length_penalty=float("nan")), "length_penalty"),
    (dict(beam_width=2, max_tokens=3, ignore_eos=1), "ignore_eos"),
])
def test_bad_params_name_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        BeamSearchParams(**kw)


def test_bad_prompts_and_params_type():
    llm = LLM(get_loaded(make_hf_model("llama", seed=5)), num_blocks=16)
    with pytest.raises(ValueError, match="BeamSearchParams"):
        llm.beam_search([[5, 6]], fastinfer.SamplingParams())
    with pytest.raises(ValueError, match="prompts"):
        llm.beam_search([], BeamSearchParams(beam_width=2, max_tokens=2))


def test_a_beam_at_the_length_limit_finishes_whatever_else_runs():
    """Beams that reach max_model_len are finished as they are: a prompt's result does not depend on the
    other prompts of the call."""
    hf = make_hf_model("llama", seed=6)
    llm = LLM(get_loaded(hf), num_blocks=32, max_model_len=12)
    params = BeamSearchParams(beam_width=2, max_tokens=8, ignore_eos=True)
    alone = llm.beam_search([[5, 6, 7, 8, 9, 10, 11, 12]], params)[0]
    together = llm.beam_search([[5, 6, 7, 8, 9, 10, 11, 12], [40, 41]], params)[0]
    assert [s.tokens for s in alone.sequences] == [s.tokens for s in together.sequences]
    assert all(len(s.tokens) == 12 for s in alone.sequences)


def test_length_penalty_must_be_finite():
    with pytest.raises(ValueError, match="length_penalty"):
        BeamSearchParams(beam_width=2, max_tokens=2, length_penalty=float("inf"))

