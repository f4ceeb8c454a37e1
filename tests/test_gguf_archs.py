"""GGUF files of Mixtral (llama with experts), Qwen2-MoE, Qwen3-MoE, Phi-3 (fused qkv / gate_up, partial rotary,
LongRoPE, sliding window), Granite and Granite-MoE (their four multipliers), Gemma 2 / 3 and OLMo-2 against the HF
models they were written from, CPU fp32.

`write_gguf` plays llama.cpp's convert_hf_to_gguf.py: tensor names from gguf-py's own name map (not fastinfer's),
llama's q / k rows interleaved, experts stacked [E, rows, K], Qwen2-MoE's shared-expert gate as a vector, the
metadata keys those converters write.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fastinfer
from models import left_padded_batch, make_hf_model
from test_loader_parity import fi_logits, hf_logits

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
from test_gguf import TOKENS, add_tiny_vocab, llama_cpp_permute  # noqa: E402

PROMPT = [5, 17, 33, 2, 99, 250, 7, 64, 128, 11, 3, 200, 41, 8, 19, 77, 23]
VOCAB = len(TOKENS)
_ARCH = {"mixtral": "llama", "qwen2-moe": "qwen2moe", "qwen3-moe": "qwen3moe", "phi3": "phi3", "phi3-partial": "phi3"}


def write_gguf(model, path, qtype="F32", drop=(), meta=None, tokenizer=None, split_experts=False, skip_keys=()):
    """model: a small HF model of one of _ARCH's variants (or Llama); qtype: the type of every 2-D / 3-D weight;
    tokenizer: the tokenizer.ggml.* metadata (default: test_gguf's byte-level BPE vocabulary); split_experts: one
    tensor per expert (blk.N.ffn_gate.J.weight, early Mixtral files); skip_keys: metadata keys left out."""
    cfg = model.config
    arch = {"MixtralForCausalLM": "llama", "Qwen2MoeForCausalLM": "qwen2moe", "Qwen3MoeForCausalLM": "qwen3moe",
            "Phi3ForCausalLM": "phi3", "LlamaForCausalLM": "llama", "GraniteForCausalLM": "granite",
            "GraniteMoeForCausalLM": "granitemoe", "Gemma2ForCausalLM": "gemma2",
            "Gemma3ForCausalLM": "gemma3", "Olmo2ForCausalLM": "olmo2"}[type(model).__name__]
    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_enum, cfg.num_hidden_layers)
    dense_names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    writer = gguf.GGUFWriter(path, arch)
    add_key = writer.add_key_value
    writer.add_key_value = lambda key, *a, **k: None if key.removeprefix(f"{arch}.") in skip_keys else add_key(key, *a, **k)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rope = cfg.rope_parameters
    rope = rope.get("full_attention", rope)  # Gemma 3's: the global layers' (llama.cpp fixes the sliding ones')
    writer.add_rope_freq_base(rope["rope_theta"])
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    if arch.startswith("gemma"):  # llama.cpp derives the layer pattern, the scale and Gemma 3's local rope base
        writer.add_sliding_window(cfg.sliding_window)
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if getattr(cfg, key, None) is not None:
                getattr(writer, f"add_{key}")(getattr(cfg, key))
    experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)
    if experts:
        writer.add_expert_count(experts)
        writer.add_expert_used_count(cfg.num_experts_per_tok)
        if arch not in ("llama", "granitemoe"):
            writer.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        if arch == "qwen2moe":
            writer.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    if arch.startswith("granite"):  # the converter's names for Granite's multipliers
        writer.add_attention_scale(cfg.attention_multiplier)
        writer.add_embedding_scale(cfg.embedding_multiplier)
        writer.add_residual_scale(cfg.residual_multiplier)
        writer.add_logit_scale(cfg.logits_scaling)
    if arch == "phi3":
        partial = rope.get("partial_rotary_factor", 1.0)
        writer.add_rope_dimension_count(int(partial * cfg.hidden_size) // cfg.num_attention_heads)
        writer.add_sliding_window(cfg.sliding_window or 0)
        original = getattr(cfg, "original_max_position_embeddings", None) or cfg.max_position_embeddings
        writer.add_rope_scaling_orig_ctx_len(original)
        if rope.get("long_factor"):
            scale = cfg.max_position_embeddings / original
            writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)))
            writer.add_tensor("rope_factors_long.weight", np.asarray(rope["long_factor"], np.float32))
            writer.add_tensor("rope_factors_short.weight", np.asarray(rope["short_factor"], np.float32))
    if tokenizer is None:
        add_tiny_vocab(writer)
        writer.add_pad_token_id(0)
    else:
        writer.add_tokenizer_model(tokenizer["tokenizer.ggml.model"])
        writer.add_token_list(tokenizer["tokenizer.ggml.tokens"])
        writer.add_token_scores(tokenizer["tokenizer.ggml.scores"])
        writer.add_token_types(tokenizer["tokenizer.ggml.token_type"])
        writer.add_bos_token_id(tokenizer["tokenizer.ggml.bos_token_id"])
        writer.add_eos_token_id(tokenizer["tokenizer.ggml.eos_token_id"])
        writer.add_unk_token_id(tokenizer["tokenizer.ggml.unknown_token_id"])
    writer.add_vocab_size(cfg.vocab_size)
    for key, value in (meta or {}).items():
        (writer.add_bool if isinstance(value, bool) else writer.add_uint32)(f"{arch}.{key}", value)

    def add(name, tensor):
        if name in drop:
            return
        array = tensor.detach().float().numpy()
        if array.ndim >= 2 and qtype != "F32":
            kind = gguf.GGMLQuantizationType[qtype]
            writer.add_tensor(name, gguf.quants.quantize(array, kind), raw_dtype=kind)
        else:
            writer.add_tensor(name, array)

    for hf_name, tensor in model.state_dict().items():
        base, _, suffix = hf_name.rpartition(".")
        if base.endswith(("mlp.experts", "block_sparse_moe.experts")):  # transformers 5's fused [E, 2 F, K] / [E, K, F]
            block = f"blk.{hf_name.split('.')[2]}"
            half = tensor.shape[1] // 2
            parts = {"gate": tensor[:, :half], "up": tensor[:, half:]} if suffix == "gate_up_proj" else {"down": tensor}
            for part, stacked in parts.items():
                if split_experts:
                    for j, expert in enumerate(stacked):
                        add(f"{block}.ffn_{part}.{j}.weight", expert)
                else:
                    add(f"{block}.ffn_{part}_exps.weight", stacked)
            continue
        # a dense MLP in a MoE model (HF's mlp_only_layers; llama.cpp's MoE graphs have none): llama's names
        # (transformers 5 names Granite-MoE's router block_sparse_moe.router, checkpoints ...router.layer)
        name = names.get_name(base) or names.get_name(base + ".layer") or dense_names.get_name(base)
        assert name is not None, hf_name
        if arch in ("llama", "granite", "granitemoe") and name.endswith(("attn_q", "attn_k")):
            heads = cfg.num_attention_heads if name.endswith("attn_q") else cfg.num_key_value_heads
            tensor = llama_cpp_permute(tensor, heads)
        if name.endswith("ffn_gate_inp_shexp"):
            tensor = tensor.reshape(-1)  # the converter stores [1, hidden] as a vector
        if arch.startswith("gemma") and name.endswith("norm"):
            tensor = tensor + 1  # the converter stores Gemma's 1 + w
        add(f"{name}.{suffix}", tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


CASES = {"mixtral": ("mixtral", {}), "qwen2-moe": ("qwen2-moe", {}),
         "qwen2-moe-dense-last": ("qwen2-moe", {"mlp_only_layers": [1], "qkv_bias": False}),
         "qwen3-moe": ("qwen3-moe", {"norm_topk_prob": True}),
         "phi3": ("phi3", {}), "phi3-partial": ("phi3-partial", {}),
         "granite": ("granite", {"tie_word_embeddings": False}), "granite-tied": ("granite", {}),
         "granitemoe": ("granitemoe", {"residual_multiplier": 0.22, "embedding_multiplier": 12.0}),
         # llama.cpp's Gemma: every second (Gemma 2) / sixth (Gemma 3) layer global, query_pre_attn_scalar = head_dim
         "gemma2": ("gemma2", {"query_pre_attn_scalar": 16}),
         "olmo2": ("olmo2", {}),
         "gemma3": ("gemma3", {"query_pre_attn_scalar": 16, "num_hidden_layers": 6, "layer_types": None,
                               "sliding_window_pattern": 6}),
         "phi3-window": ("phi3", {"sliding_window": 6})}


@pytest.mark.parametrize("case", CASES)
def test_logits_match_the_hf_model_it_was_written_from(tmp_path, case):
    variant, overrides = CASES[case]
    model = make_hf_model(variant, seed=1, vocab_size=VOCAB, **overrides)
    loaded = fastinfer.load_model(write_gguf(model, tmp_path / "m.gguf"))
    assert loaded.model.config.architecture == type(model).__name__
    torch.testing.assert_close(fi_logits(loaded, PROMPT), hf_logits(model, PROMPT), rtol=0, atol=1e-5)


def test_config_reads_the_moe_fields(tmp_path):
    from fastinfer.loader.gguf import gguf_config, open_gguf
    model = make_hf_model("qwen2-moe", vocab_size=VOCAB, mlp_only_layers=[1])
    cfg = gguf_config(open_gguf(write_gguf(model, tmp_path / "q.gguf")))
    assert cfg["architectures"] == ["Qwen2MoeForCausalLM"] and cfg["mlp_only_layers"] == [1]
    assert (cfg["num_experts"], cfg["num_experts_per_tok"], cfg["moe_intermediate_size"],
            cfg["shared_expert_intermediate_size"], cfg["norm_topk_prob"]) == (4, 2, 48, 80, False)
    model = make_hf_model("mixtral", vocab_size=VOCAB)
    cfg = gguf_config(open_gguf(write_gguf(model, tmp_path / "m.gguf")))
    assert cfg["model_type"] == "mixtral" and cfg["num_local_experts"] == 4 and cfg["intermediate_size"] == 160


def test_early_files(tmp_path):
    """Early llama.cpp files: Mixtral with one tensor per expert (blk.N.ffn_gate.J), Qwen-MoE without
    expert_feed_forward_length (llama.cpp then sizes the experts feed_forward_length / expert_used_count)."""
    model = make_hf_model("mixtral", seed=6, vocab_size=VOCAB)
    loaded = fastinfer.load_model(write_gguf(model, tmp_path / "m.gguf", split_experts=True))
    torch.testing.assert_close(fi_logits(loaded, PROMPT), hf_logits(model, PROMPT), rtol=0, atol=1e-5)
    model = make_hf_model("qwen2-moe", seed=6, vocab_size=VOCAB, intermediate_size=96)  # 96 / top-2 = 48
    loaded = fastinfer.load_model(write_gguf(model, tmp_path / "q.gguf", skip_keys=("expert_feed_forward_length",)))
    torch.testing.assert_close(fi_logits(loaded, PROMPT), hf_logits(model, PROMPT), rtol=0, atol=1e-5)


def test_router_renormalization_follows_llama_cpp(tmp_path):
    """llama.cpp renormalizes Qwen3-MoE's top-k weights and not Qwen2-MoE's, unless the file says otherwise
    ({arch}.expert_weights_norm)."""
    from fastinfer.loader.gguf import gguf_config, open_gguf
    for variant, meta, expected in [("qwen3-moe", {}, True), ("qwen2-moe", {}, False),
                                    ("qwen3-moe", {"expert_weights_norm": False}, False)]:
        model = make_hf_model(variant, vocab_size=VOCAB)
        cfg = gguf_config(open_gguf(write_gguf(model, tmp_path / "r.gguf", meta=meta)))
        assert cfg["norm_topk_prob"] is expected, (variant, meta)


def test_phi3_longrope(tmp_path):
    """Phi-3's LongRoPE factors come from the rope_factors_long / _short tensors: the logits of a prompt past the
    original context (long factors) and of one within it (short) equal HF's."""
    from test_longrope import longrope_model, prompt
    from fastinfer.loader.gguf import gguf_config, open_gguf
    model = longrope_model(vocab_size=VOCAB)
    path = write_gguf(model, tmp_path / "l.gguf")
    scaling = gguf_config(open_gguf(path))["rope_scaling"]
    rope = model.config.rope_parameters
    assert scaling == {"rope_type": "longrope", "long_factor": rope["long_factor"], "short_factor": rope["short_factor"],
                       "original_max_position_embeddings": 32}  # the attention factor HF derives is left to it
    loaded = fastinfer.load_model(path)
    for n in (20, 50):
        ids = [t % VOCAB for t in prompt(n)]
        torch.testing.assert_close(fi_logits(loaded, ids), hf_logits(model, ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", ["mixtral", "qwen3-moe"])
def test_greedy_generate_from_the_file_equals_hf(tmp_path, variant):
    # llama.cpp runs every qwen3moe file with renormalized top-k weights (as the published Qwen3-MoE models)
    model = make_hf_model(variant, seed=2, vocab_size=VOCAB, **({"norm_topk_prob": True} if variant == "qwen3-moe" else {}))
    path = write_gguf(model, tmp_path / "m.gguf")
    ids, mask = left_padded_batch([5, 17, 1, 9], VOCAB, 0, seed=2)
    kw = dict(max_new_tokens=12, do_sample=False, eos_token_id=None)
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, pad_token_id=0, **kw)
    assert torch.equal(fastinfer.generate(str(path), ids, attention_mask=mask, pad_token_id=0, **kw), expected)


@pytest.mark.parametrize("variant, qtype", [("mixtral", "Q4_0"), ("qwen2-moe", "Q4_1"), ("qwen3-moe", "Q4_1"),
                                            ("phi3", "Q4_0")])
def test_q4_experts_run_as_4_bit(tmp_path, variant, qtype):
    """quantization="gguf": every projection (experts and Qwen2-MoE's shared expert included, routers not) stays
    in its Q4 blocks and gives the dequantized model's logits."""
    from fastinfer.models.linear import Int4Linear
    # the packed 4-bit layout takes N and K in multiples of 64
    sizes = dict(hidden_size=128, intermediate_size=128, moe_intermediate_size=64, shared_expert_intermediate_size=128,
                 head_dim=32)
    model = make_hf_model(variant, seed=3, vocab_size=VOCAB, **{k: v for k, v in sizes.items() if k != "head_dim" or
                                                                 variant == "qwen3-moe"})
    path = write_gguf(model, tmp_path / "q.gguf", qtype=qtype)
    native, dense = fastinfer.load_model(path, quantization="gguf"), fastinfer.load_model(path)
    layer = native.model.layers[1]
    if layer.moe is not None:
        assert all(isinstance(p, Int4Linear) for pair in layer.moe.experts for p in pair)
        assert not isinstance(layer.moe.router, Int4Linear)
    torch.testing.assert_close(fi_logits(native, PROMPT), fi_logits(dense, PROMPT), rtol=0, atol=2e-4)


def test_granite_q4_files_dequantize(tmp_path):
    """Granite folds its residual multiplier into o_proj / down_proj, which 4-bit weights cannot take: a Q4 Granite
    file loads dequantized, and quantization='gguf' is refused by name."""
    model = make_hf_model("granitemoe", seed=3, vocab_size=VOCAB, hidden_size=128, intermediate_size=128)
    path = write_gguf(model, tmp_path / "g.gguf", qtype="Q4_1")
    assert fastinfer.load_model(path).model.layers[0].moe is not None
    with pytest.raises(ValueError, match="residual_multiplier"):
        fastinfer.load_model(path, quantization="gguf")


def test_transformers_gguf_reader_agrees(tmp_path):
    """transformers' own GGUF reader (which follows llama.cpp's layout) builds the same Phi-3 from the file."""
    model = make_hf_model("phi3", seed=4, vocab_size=VOCAB)
    write_gguf(model, tmp_path / "p.gguf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="p.gguf",
                                                               dtype=torch.float32).eval()
    torch.testing.assert_close(fi_logits(fastinfer.load_model(tmp_path / "p.gguf"), PROMPT), hf_logits(theirs, PROMPT),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant, edit, match", [
    ("mixtral", dict(drop=("blk.1.ffn_gate_inp.weight",)), "every layer has experts"),
    ("qwen3-moe", dict(drop=("blk.1.ffn_down_exps.weight",)), r"missing.*experts\.0\.down_proj"),
    ("qwen3-moe", dict(meta={"expert_gating_func": 2}), "expert_gating_func"),
    ("qwen3-moe", dict(meta={"expert_used_count": 9}), "expert_used_count"),
    ("phi3", dict(drop=("blk.0.attn_qkv.weight",)), r"missing.*qkv_proj"),
    ("olmo2", dict(meta={"attention.sliding_window": 4096}), "OLMo-3"),
])
def test_bad_files_name_what_is_wrong(tmp_path, variant, edit, match):
    model = make_hf_model(variant, vocab_size=VOCAB)
    meta = edit.get("meta", {})
    if "expert_used_count" in meta:  # written by the writer too: rewrite the key it writes
        model.config.num_experts_per_tok = meta.pop("expert_used_count")
    with pytest.raises(ValueError, match=match):
        fastinfer.load_model(write_gguf(model, tmp_path / "bad.gguf", drop=edit.get("drop", ()), meta=meta))


def test_llama_cpp_defaults_and_spellings(tmp_path):
    """What llama.cpp reads leniently, read the same way: a Gemma 2 file without attention.sliding_window (files made
    before the key: 4096), a Gemma 3 one without it (no sliding layers; then no final logit cap either, which
    llama.cpp applies only to models without them), Granite's optional scales (attention: head_dim ** -0.5,
    embedding / residual: 1), one head_count_kv per layer when all equal."""
    from fastinfer.loader.gguf import gguf_config, open_gguf

    def config(variant, name, skip=(), meta=None, **overrides):
        model = make_hf_model(variant, vocab_size=VOCAB, **overrides)
        return gguf_config(open_gguf(write_gguf(model, tmp_path / name, skip_keys=skip, meta=meta)))

    assert config("gemma2", "g2.gguf", ("attention.sliding_window",))["sliding_window"] == 4096
    cfg = config("gemma3", "g3.gguf", ("attention.sliding_window",), final_logit_softcapping=5.0)
    assert cfg["sliding_window"] is None and cfg["final_logit_softcapping"] == 5.0
    assert config("gemma3", "g3w.gguf", final_logit_softcapping=5.0)["final_logit_softcapping"] is None
    cfg = config("granite", "gr.gguf", ("attention.scale", "embedding_scale", "residual_scale"))
    assert (cfg["attention_multiplier"], cfg["embedding_multiplier"], cfg["residual_multiplier"]) == (0.25, 1.0, 1.0)
    assert cfg["logits_scaling"] == 4.0
    model = make_hf_model("llama", vocab_size=VOCAB)
    path = write_gguf(model, tmp_path / "kv.gguf", skip_keys=("attention.head_count_kv",))
    _add_key(path, "llama.attention.head_count_kv", [2, 2])
    assert gguf_config(open_gguf(path))["num_key_value_heads"] == 2


def _add_key(path, key, values):
    """Rewrite a GGUF file with one more metadata key (an array of uint32)."""
    from fastinfer.loader.gguf import open_gguf
    file = open_gguf(path)
    writer = gguf.GGUFWriter(str(path) + ".tmp", file.metadata["general.architecture"])
    reader = gguf.GGUFReader(path)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        writer.add_key_value(field.name, field.contents(), field.types[0],
                             field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None)
    writer.add_array(key, values)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, tensor.data, raw_shape=list(reversed(tensor.shape.tolist())),
                          raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    import os
    os.replace(str(path) + ".tmp", path)


def test_gemma_norm_multipliers_are_the_files(tmp_path):
    """A Gemma GGUF stores 1 + w (fp32); loaded in bf16, each norm multiplier is that stored value exactly (llama.cpp's),
    not 1 + w with w rounded to bf16 (HF's, for a checkpoint)."""
    from fastinfer.loader.gguf import dequantize, open_gguf
    model = make_hf_model("gemma3", vocab_size=VOCAB, query_pre_attn_scalar=16)
    path = write_gguf(model, tmp_path / "g.gguf")
    stored = dequantize(open_gguf(path).tensors["blk.0.attn_norm.weight"])
    layer = fastinfer.load_model(path, dtype=torch.bfloat16).model.layers[0]
    assert torch.equal(layer.input_norm, stored)


def test_granite_refact_pre_tokenizer(tmp_path):
    """llama.cpp's converter marks Granite's vocabulary `refact`: split as starcoder (digits one by one)."""
    from fastinfer.loader.gguf_tokenizer import build_tokenizer
    from test_gguf import TOKENS
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "refact", "tokenizer.ggml.tokens": TOKENS,
            "tokenizer.ggml.merges": ["Ġ t", "h e", "Ġt he"], "tokenizer.ggml.token_type": [3] * 3 + [1] * (VOCAB - 3)}
    tok = build_tokenizer(meta, tmp_path / "x.gguf")
    assert tok.convert_ids_to_tokens(tok("a 123").input_ids) == ["a", "Ġ", "1", "2", "3"]
