"""The LLM batch API on the real default model: text, stop strings, streaming, logprobs, bad input."""
from __future__ import annotations

import math

import pytest

from fastinfer.llm import LLM
from fastinfer.sampling_params import SamplingParams

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def llm():
    from fastinfer.loader.gguf import default_model_path
    return LLM(str(default_model_path()), kv_cache_memory_bytes=64 << 20, max_num_seqs=8)


def test_kv_pool_sized_from_byte_budget(llm):
    cfg = llm.loaded.model.config
    block_bytes = cfg.num_layers * 2 * 16 * cfg.num_kv_heads * cfg.head_dim * 4  # fp32 on the CPU
    assert llm.engine.config.num_blocks == (64 << 20) // block_bytes


def test_text_outputs_in_input_order(llm):
    prompts = ["The capital of France is", "1, 2, 3, 4,", "The capital of France is"]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6), use_tqdm=True)
    assert [o.prompt for o in outs] == prompts
    assert "Paris" in outs[0].outputs[0].text
    assert outs[0].outputs[0].token_ids == outs[2].outputs[0].token_ids
    assert all(o.finished and o.outputs[0].finish_reason in ("stop", "length") for o in outs)
    assert llm.tokenizer.decode(outs[1].outputs[0].token_ids) == outs[1].outputs[0].text


def test_stop_string_and_stop_token(llm):
    free = llm.generate(["1, 2, 3, 4,"], SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0].outputs[0]
    assert " 6" in free.text
    out = llm.generate(["1, 2, 3, 4,"], SamplingParams(temperature=0, max_tokens=12, stop=[" 6"]),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == " 6" and out.text == free.text[:free.text.index(" 6")]
    tok = free.token_ids[2]
    out = llm.generate(["1, 2, 3, 4,"], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[tok]),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == tok and out.token_ids == free.token_ids[:3]


def test_streaming_deltas_add_up(llm):
    prompts = ["Once upon a time", "The capital of France is"]
    params = SamplingParams(temperature=0, max_tokens=10)
    final = llm.generate(prompts, params, use_tqdm=False)
    texts, tokens, reasons = ["", ""], [[], []], [None, None]
    for delta in llm.stream(prompts, params):
        texts[delta.index] += delta.text
        tokens[delta.index] += delta.token_ids
        reasons[delta.index] = delta.finish_reason
    assert texts == [o.outputs[0].text for o in final]
    assert tokens == [o.outputs[0].token_ids for o in final]
    assert reasons == [o.outputs[0].finish_reason for o in final]


def test_logprobs(llm):
    out = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=3, logprobs=2),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == 3
    for tok, entry in zip(out.token_ids, out.logprobs):
        assert tok in entry and max(entry.values()) == entry[tok]  # greedy picks the most likely
        assert all(v <= 0 for v in entry.values()) and 2 <= len(entry) <= 3
        assert math.isfinite(entry[tok])


@pytest.mark.parametrize("prompts, params, match", [
    (["ok", ""], None, r"prompts\[1\]: prompt is empty"),
    ([[1, 2, 10**6]], None, "outside the vocabulary"),
    (["ok"], [SamplingParams(), SamplingParams()], "2 entries for 1 prompts"),
    (["ok"], SamplingParams(max_tokens=10**6), "max_model_len"),
    ([], None, "prompts is empty"),
])
def test_bad_requests_fail_before_anything_runs(llm, prompts, params, match):
    with pytest.raises(ValueError, match=match):
        llm.generate(prompts, params, use_tqdm=False)
    assert not llm.engine.has_unfinished()


@pytest.mark.parametrize("field, value", [("temperature", -1.0), ("top_p", 0.0), ("top_k", -2), ("max_tokens", 0),
                                          ("n", 0), ("min_p", 2.0)])
def test_sampling_params_validated_on_construction(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


# ---- LLM.chat (vLLM's chat API) ----------------------------------------------------------------------

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_chat_renders_the_template_and_generates(llm):
    """The model's chat template (SmolLM2's, from the GGUF), tokenized as HF's apply_chat_template does;
    the output's prompt is the rendered text, and the tokens are generate()'s on those ids."""
    params = SamplingParams(temperature=0, max_tokens=10)
    out = llm.chat(QUESTION, params, use_tqdm=False)[0]
    expected_ids = llm.tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True)
    expected_ids = expected_ids if isinstance(expected_ids, list) else expected_ids["input_ids"]  # (a BatchEncoding)
    assert out.prompt_token_ids == list(expected_ids)
    assert out.prompt.startswith("<|im_start|>") and out.prompt.endswith("<|im_start|>assistant\n")
    assert "Paris" in out.outputs[0].text
    plain = llm.generate({"prompt_token_ids": list(expected_ids)}, params, use_tqdm=False)[0]
    assert plain.outputs[0].token_ids == out.outputs[0].token_ids


def test_chat_batches_conversations_with_their_own_params(llm):
    conversations = [QUESTION, [{"role": "system", "content": "Answer in one word."}, *QUESTION]]
    params = [SamplingParams(temperature=0, max_tokens=4), SamplingParams(temperature=0, max_tokens=2)]
    outs = llm.chat(conversations, params, use_tqdm=False)
    assert len(outs) == 2 and len(outs[0].outputs[0].token_ids) == 4 and len(outs[1].outputs[0].token_ids) <= 2
    assert "Answer in one word." in outs[1].prompt and "Answer in one word." not in outs[0].prompt


def test_chat_content_parts_and_kwargs_override(llm):
    """OpenAI-style text parts are joined with newlines (vLLM's string format); chat_template_kwargs win
    over the named arguments, as vLLM merges them."""
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is the capital"},
                                          {"type": "text", "text": "of France?"}]}]
    params = SamplingParams(temperature=0, max_tokens=1)
    out = llm.chat(parts, params, use_tqdm=False)[0]
    assert "What is the capital\nof France?" in out.prompt
    out = llm.chat(QUESTION, params, use_tqdm=False, chat_template_kwargs={"add_generation_prompt": False})[0]
    assert not out.prompt.endswith("<|im_start|>assistant\n")


def test_chat_continue_final_message_and_custom_template(llm):
    partial = [*QUESTION, {"role": "assistant", "content": "The capital of France is"}]
    out = llm.chat(partial, SamplingParams(temperature=0, max_tokens=3), use_tqdm=False,
                   add_generation_prompt=False, continue_final_message=True)[0]
    assert out.prompt.endswith("The capital of France is") and "Paris" in out.outputs[0].text
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{{ suffix }}"
    out = llm.chat(QUESTION, SamplingParams(temperature=0, max_tokens=1), use_tqdm=False, chat_template=template,
                   add_generation_prompt=False, chat_template_kwargs={"suffix": "assistant:"})[0]
    assert out.prompt == "user: What is the capital of France?\nassistant:"


@pytest.mark.parametrize("kwargs, match", [
    (dict(messages=[]), "messages must be a non-empty list"),
    (dict(messages="hello"), "messages must be a non-empty list"),
    (dict(messages=[{"role": "user"}]), r"messages\[0\]\['content'\] must be a str"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]),
     r"messages\[0\]\['content'\] parts must be"),
    (dict(messages=[{"role": 1, "content": "x"}]), r"messages\[0\]\['role'\] must be a str"),
    (dict(messages=[QUESTION, ["not a dict"]]), r"messages\[1\]\[0\] must be a dict"),
    (dict(messages=[QUESTION, []]), r"messages\[1\] must be a non-empty list"),
    (dict(messages=QUESTION, continue_final_message=True), "cannot both be set"),
    (dict(messages=QUESTION, chat_template_kwargs=["x"]), "chat_template_kwargs must be a dict"),
    (dict(messages=QUESTION, chat_template="{{ raise_exception('no system role') }}"),
     r"conversation 0: the chat template could not render it: .*no system role"),
    (dict(messages=QUESTION, sampling_params=SamplingParams(max_tokens=10**6)), r"prompts\[0\]"),
])
def test_chat_bad_input_fails_before_anything_runs(llm, kwargs, match):
    with pytest.raises(ValueError, match=match):
        llm.chat(**kwargs, use_tqdm=False)
    assert not llm.engine.has_unfinished()


def test_chat_needs_a_tokenizer():
    from models import make_hf_model
    llm = LLM(make_hf_model("llama"), kv_cache_memory_bytes=8 << 20)  # an HF model object: no tokenizer
    with pytest.raises(ValueError, match="chat needs a tokenizer"):
        llm.chat(QUESTION, use_tqdm=False)


def test_tokenizer_argument_and_vllm_signature(tmp_path):
    """LLM(tokenizer=...) as vLLM: a local tokenizer directory or object for a model that has none (an HF
    model object), so text prompts and chat work; tensor_parallel_size 1 only; trust_remote_code accepted."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers
    from models import make_hf_model
    vocab = {c: i for i, c in enumerate(["<s>", "</s>"] + list("abcdefghijklmnopqrstuvwxyz "))}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    tok.save_pretrained(tmp_path)
    model = make_hf_model("llama")
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    for given in (str(tmp_path), tok):
        llm = LLM(model, kv_cache_memory_bytes=8 << 20, tokenizer=given, trust_remote_code=True)
        out = llm.generate("hello world", params, use_tqdm=False)[0]
        assert out.prompt_token_ids == tok("hello world")["input_ids"] and len(out.outputs[0].token_ids) == 3
        assert llm.chat([{"role": "user", "content": "hi"}], params, use_tqdm=False)[0].prompt == "hi "
    assert LLM(model, kv_cache_memory_bytes=8 << 20).tokenizer is None  # the cached model kept its own (none)
    with pytest.raises(ValueError, match="is not a directory"):
        LLM(model, kv_cache_memory_bytes=8 << 20, tokenizer=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="tokenizer must be a directory or a tokenizer"):
        LLM(model, kv_cache_memory_bytes=8 << 20, tokenizer=42)
    with pytest.raises(ValueError, match="tensor_parallel_size=2"):
        LLM(model, tensor_parallel_size=2)
