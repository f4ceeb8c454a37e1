"""The default real model, SmolLM2-135M-Instruct (GGUF): HF parity, perplexity, the CLI."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import fastinfer
from fastinfer.evaluate import perplexity

transformers = pytest.importorskip("transformers")

PROMPTS = ["The capital of France is", "Here is a recipe for a simple tomato soup:",
           "def fibonacci(n):", "In 1492, Columbus"]


@pytest.fixture(scope="module")
def smollm2():
    """(gguf path, the same dequantized weights in an HF LlamaForCausalLM, tokenizer)."""
    from fastinfer.loader.gguf import default_model_path, read_gguf
    path = default_model_path()
    cfg, state_dict, tokenizer = read_gguf(path, torch.float32)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
    missing, unexpected = hf.load_state_dict(state_dict, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embedding
    hf.tie_weights()
    return path, hf, tokenizer


@pytest.mark.slow
def test_greedy_matches_hf_on_real_prompts(smollm2):
    path, hf, tok = smollm2
    tok.padding_side = "left"
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        expected = hf.generate(**batch, **kw)
    ours = fastinfer.generate(str(path), batch["input_ids"], attention_mask=batch["attention_mask"], **kw)
    assert torch.equal(ours, expected), tok.batch_decode(ours)
    assert "Paris" in tok.decode(ours[0])


@pytest.mark.slow
def test_perplexity_matches_hf(smollm2):
    from text_data import novel
    path, hf, tok = smollm2
    ids = tok(novel("prideprejudice"))["input_ids"][:2048]
    assert len(ids) == 2048
    ours = perplexity(str(path), ids, window=512)
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), 512):
            window = torch.tensor([ids[start:start + 512]])
            logits = hf(window).logits[0, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum"))
            count += window.shape[1] - 1
    theirs = float(torch.exp(torch.tensor(nll / count)))
    assert abs(ours - theirs) / theirs < 0.01, (ours, theirs)
    assert 5 < ours < 60, ours  # MODELS.md: about 21


@pytest.mark.slow
def test_cli_generates_real_text():
    out = subprocess.run([sys.executable, "-m", "fastinfer", "generate", "The capital of France is",
                          "--max-new-tokens", "4", "--no-stream"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout


@pytest.mark.slow
def test_prompt_lookup_on_a_summary_prompt(smollm2):
    from text_data import novel

    from fastinfer import LLM, SamplingParams
    path, _, tok = smollm2
    passage = novel("prideprejudice").split("Chapter 1", 1)[1][:1200]
    ids = tok.apply_chat_template([{"role": "user", "content": f"Summarize, quoting key sentences:\n\n{passage}"}],
                                  add_generation_prompt=True, return_dict=True)["input_ids"]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    plain = LLM(str(path), kv_cache_memory_bytes=64 << 20).generate([ids], params, use_tqdm=False)[0]
    spec = LLM(str(path), kv_cache_memory_bytes=64 << 20,
               speculative={"method": "ngram", "num_tokens": 4})
    out = spec.generate([ids], params, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == plain.outputs[0].token_ids
    stats = spec.speculative_stats
    print(f"prompt lookup: mean acceptance length {stats.mean_acceptance_length:.2f}, "
          f"acceptance rate {stats.acceptance_rate:.2f}")
    assert stats.mean_acceptance_length > 1.0
