"""Review of the quantized checkpoint paths: GPTQ / AWQ / GGUF 4-bit and FP8 checkpoints.

Checkpoints are written here with safetensors (or gguf's writer) from random codes and scales, in
the published layouts, with packers and fp32 dequantizers written independently of
fastinfer.quant. The reference is an HF Llama whose weights are those dequantized values (fp32, CPU).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import fastinfer
from fastinfer.metadata import SeqChunk
from fastinfer.runner import ModelRunner
from models import make_hf_model

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

# 4-bit projections need whole 64-row strips and K a multiple of 64 (and of the group): the loader tests' model
from test_quant_loaders import PROJECTIONS, PROMPT, SHAPE  # noqa: E402
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ gemm: nibble i of a word holds column 8 c + ORDER[i]


# ---- independent 4-bit formats ----------------------------------------------------------------------

def _int32(words: torch.Tensor) -> torch.Tensor:
    """uint32 values held in int64 -> the same bits as int32."""
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def pack_rows(x: torch.Tensor) -> torch.Tensor:
    """[R, C] codes -> int32 [R / 8, C]: element (8 i + j, c) in bits 4j..4j+3 of word (i, c)."""
    x = x.to(torch.int64) & 0xF
    out = torch.zeros(x.shape[0] // 8, x.shape[1], dtype=torch.int64)
    for j in range(8):
        out |= x[j::8] << (4 * j)
    return _int32(out)


def pack_cols(x: torch.Tensor, order=tuple(range(8))) -> torch.Tensor:
    """[R, C] codes -> int32 [R, C / 8]: nibble i of word (r, c) holds element (r, 8 c + order[i])."""
    x = x.to(torch.int64) & 0xF
    out = torch.zeros(x.shape[0], x.shape[1] // 8, dtype=torch.int64)
    for i, col in enumerate(order):
        out |= x[:, col::8] << (4 * i)
    return _int32(out)


def random_4bit(n: int, k: int, group: int, gen: torch.Generator, zeros: str = "asym"):
    """codes [N, K] in 0..15, fp16 scales [N, G] and integer zeros [N, G] (G = ceil(K / group))."""
    groups = -(-k // group)
    codes = torch.randint(0, 16, (n, k), generator=gen)
    scales = (0.01 + 0.02 * torch.rand(n, groups, generator=gen)).half()
    if zeros == "sym":
        z = torch.full((n, groups), 8)
    else:  # "asym": z >= 1 (AutoGPTQ's v1 z - 1 cannot hold z = 0); "any": 0..15
        z = torch.randint(0 if zeros == "any" else 1, 16, (n, groups), generator=gen)
    return codes, scales, z


def dequantize_4bit(codes, scales, zeros, group) -> torch.Tensor:
    """w[n, k] = (q[n, k] - z[n, k // group]) * s[n, k // group], in fp32."""
    g = torch.arange(codes.shape[1]) // group
    return (codes.float() - zeros.float()[:, g]) * scales.float()[:, g]


def gptq_tensors(codes, scales, zeros, group, fmt="gptq") -> dict[str, torch.Tensor]:
    """AutoGPTQ / GPTQModel: qweight [K/8, N] packed along K, qzeros [G, N/8] packed along N
    (format "gptq" stores z - 1, "gptq_v2" stores z), scales [G, N] fp16, g_idx [K] int32."""
    k = codes.shape[1]
    stored = zeros - (1 if fmt == "gptq" else 0)
    return {"qweight": pack_rows(codes.t()), "qzeros": pack_cols(stored.t()),
            "scales": scales.t().contiguous(), "g_idx": (torch.arange(k) // group).to(torch.int32)}


def awq_tensors(codes, scales, zeros, group) -> dict[str, torch.Tensor]:
    """AutoAWQ gemm: qweight [K, N/8] and qzeros [G, N/8] packed along N in AWQ's order, scales [G, N]."""
    return {"qweight": pack_cols(codes.t(), AWQ_PACK_ORDER), "qzeros": pack_cols(zeros.t(), AWQ_PACK_ORDER),
            "scales": scales.t().contiguous()}


def write_4bit_checkpoint(path, qc: dict, parts, group: int, seed: int = 0, zeros: str = "asym",
                          dense=(), extra=None, variant="llama", **shape):
    """A 2-layer Llama checkpoint whose projections are 4-bit (parts(codes, scales, zeros, group)
    gives the tensors of one layer), except the modules in `dense` (stored fp16 as they are).
    Returns the HF model holding exactly the weights the checkpoint means."""
    hf = make_hf_model(variant, seed=seed, **{**SHAPE, **shape})
    gen = torch.Generator().manual_seed(seed + 100)
    tensors = {}
    with torch.no_grad():
        for name, param in hf.named_parameters():
            module = name.removesuffix(".weight")
            if module.endswith(PROJECTIONS) and module not in dense:
                codes, scales, z = random_4bit(*param.shape, group, gen, zeros)
                param.copy_(dequantize_4bit(codes, scales, z, group))
                tensors.update({f"{module}.{p}": t.contiguous() for p, t in parts(codes, scales, z, group).items()})
            elif module in dense:
                param.copy_(param.half().float())  # what the fp16 checkpoint holds
                tensors[name] = param.detach().half().contiguous()
            else:
                tensors[name] = param.detach().clone().contiguous()
    if extra is not None:
        extra(tensors)
    path.mkdir(parents=True, exist_ok=True)
    safetensors_torch.save_file(tensors, str(path / "model.safetensors"))
    config = hf.config.to_dict()
    config["quantization_config"] = qc
    (path / "config.json").write_text(json.dumps(config))
    return hf


def run_logits(model, ids=PROMPT) -> torch.Tensor:
    blocks = -(-len(ids) // 16)
    return ModelRunner(model, blocks, 16).run([SeqChunk(ids, 0, list(range(blocks)), all_logits=True)])


def hf_logits(hf, ids=PROMPT) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


def assert_matches(model, hf) -> None:
    torch.testing.assert_close(run_logits(model), hf_logits(hf), rtol=1e-4, atol=1e-4)


def gptq_config(**kw) -> dict:
    return {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": False, "desc_act": False, **kw}


def awq_config(**kw) -> dict:
    return {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm", **kw}


# ---- GPTQ / AWQ: what loads must equal the checkpoint's definition ----------------------------------

@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("fmt, zeros", [("gptq", "sym"), ("gptq", "asym"), ("gptq_v2", "asym")])
def test_gptq_group_sizes_and_formats(tmp_path, group, fmt, zeros):
    qc = gptq_config(group_size=group, sym=zeros == "sym", checkpoint_format=fmt)
    hf = write_4bit_checkpoint(tmp_path, qc, lambda *a: gptq_tensors(*a, fmt=fmt), group, seed=1, zeros=zeros)
    model = fastinfer.load_model(tmp_path, dtype=torch.float32, device="cpu").model
    assert model.quant.method == "gptq" and model.quant.group_size == group
    assert_matches(model, hf)


@pytest.mark.parametrize("group", [32, 128])
def test_awq_group_sizes(tmp_path, group):
    hf = write_4bit_checkpoint(tmp_path, awq_config(group_size=group), awq_tensors, group, seed=2)
    model = fastinfer.load_model(tmp_path, dtype=torch.float32, device="cpu").model
    assert model.quant.method == "awq"
    assert_matches(model, hf)


def test_awq_qwen2_keeps_its_qkv_bias(tmp_path):
    """Qwen2 AWQ: q/k/v carry a bias next to qweight / qzeros / scales; it passes through the converter."""
    hf = write_4bit_checkpoint(tmp_path, awq_config(group_size=64), awq_tensors, 64, seed=17, variant="qwen2")
    model = fastinfer.load_model(tmp_path, dtype=torch.float32, device="cpu").model
    assert model.layers[0].qkv.bias is not None and bool(model.layers[0].qkv.bias.abs().sum() > 0)
    assert_matches(model, hf)


def test_gptq_parts_split_across_shards_and_optional_g_idx(tmp_path):
    """A layer's qweight / qzeros / scales in different shards, in any order, some layers without g_idx."""
    hf = write_4bit_checkpoint(tmp_path, gptq_config(checkpoint_format="gptq"), gptq_tensors, 128, seed=18)
    tensors = safetensors_torch.load_file(str(tmp_path / "model.safetensors"))
    (tmp_path / "model.safetensors").unlink()
    names = sorted((n for n in tensors if not (n.startswith("model.layers.1.") and n.endswith("g_idx"))), reverse=True)
    shards = {"model-00001-of-00002.safetensors": names[0::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        safetensors_torch.save_file({k: tensors[k] for k in keys}, str(tmp_path / file))
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_matches(fastinfer.load_model(tmp_path, dtype=torch.float32, device="cpu").model, hf)


def test_gptq_desc_act_with_static_groups_loads(tmp_path):
    """desc_act=True with static_groups=True (or any act-order run whose g_idx stays k // group)
    stores the weight in input order: nothing to reorder, it must load and match."""
    qc = gptq_config(desc_act=True, static_groups=True, true_sequential=True, checkpoint_format="gptq")
    hf = write_4bit_checkpoint(tmp_path, qc, gptq_tensors, 128, seed=3)
    assert_matches(fastinfer.load_model(tmp_path, dtype=torch.float32, device="cpu").model, hf)


def test_gptq_quantized_lm_head_is_dequantized(tmp_path):
    """GPTQModel's lm_head=True: lm_head.qweight / qzeros / scales / g_idx; the head stays dense
    in fastinfer, so it must hold exactly the dequantized values."""
    gen = torch.Generator().manual_seed(7)

    def quantized_head(tensors):
        w = tensors.pop("lm_head.weight")
        codes, scales, z = random_4bit(*w.shape, 128, gen)
        tensors.update({f"lm_head.{p}": t.contiguous() for p, t in gptq_tensors(codes, scales, z, 128).items()})
        head[:] = [dequantize_4bit(codes, scales, z, 128)]
    head = []
    hf = write_4bit_checkpoint(tmp_path, gptq_config(lm_head=True), gptq_tensors, 128, seed=4, extra=quantized_head)
    with torch.no_grad():
        hf.lm_head.weight.copy_(head[0])
    assert_matches(fastinfer.load_model(tmp_path, dtype=torch.float32, device="cpu").model, hf)


@pytest.mark.parametrize("qc", [gptq_config(bits=3), gptq_config(bits=8), awq_config(bits=8),
                                gptq_config(checkpoint_format="marlin"), awq_config(version="gemv_fast")])
def test_unsupported_4bit_configs_are_refused(tmp_path, qc):
    write_4bit_checkpoint(tmp_path, qc, gptq_tensors if qc["quant_method"] == "gptq" else awq_tensors, 128, seed=5)
    with pytest.raises(ValueError, match="bits=|checkpoint_format|version"):
        fastinfer.load_model(tmp_path, dtype=torch.float32, device="cpu")


# -- bugs (these fail at the time of the review) and clear refusals --

def test_gptq_format_field_gptq_v2_is_honoured(tmp_path):
    """transformers 5's GPTQConfig spells the packing `format` ("gptq" | "gptq_v2"; checkpoint_format
    is its legacy alias). A v2 checkpoint (qzeros hold z, not z - 1) described with `format` must not
    be read as v1."""
    qc = gptq_config(format="gptq_v2")
    assert transformers.GPTQConfig.from_dict(dict(qc)).format == "gptq_v2"  # how HF reads this config
    hf = write_4bit_checkpoint(tmp_path, qc, lambda *a: gptq_tensors(*a, fmt="gptq_v2"), 128, seed=6)
    assert_matches(fastinfer.load_model(tmp_path, dtype=torch.float32, device="cpu").model, hf)


def awq_gemv_tensors(codes, scales, zeros, group) -> dict[str, torch.Tensor]:
    """AutoAWQ WQLinear_GEMV buffers: qweight [N, K/8] packed along K, qzeros [N, W] and scales
    [N, 8 W] with W = calculate_zeros_width(K, group) (ceil(K / group / 8) for group >= 128)."""
    n, k = codes.shape
    width = -(-(k // group) // 8)
    padded = torch.zeros(n, 8 * width, dtype=torch.float16)
    padded[:, :scales.shape[1]] = scales
    return {"qweight": pack_rows(codes.t()).t().contiguous(),
            "qzeros": pack_cols(torch.nn.functional.pad(zeros, (0, 8 * width - zeros.shape[1]))), "scales": padded}


def test_awq_format_field_gemv_is_refused(tmp_path):
    """transformers 5's AwqConfig spells the kernel layout `format` (version is its legacy alias). A
    GEMV checkpoint whose config says format="gemv" must be refused as version="gemv" is (naming
    the format), not read as GEMM (here: a confusing qzeros shape error)."""
    qc = {k: v for k, v in awq_config(format="gemv").items() if k != "version"}
    assert transformers.AwqConfig.from_dict(dict(qc)).format == "gemv"  # how HF reads this config
    write_4bit_checkpoint(tmp_path, qc, awq_gemv_tensors, 128, seed=7)
    with pytest.raises(ValueError, match="gemv"):
        fastinfer.load_model(tmp_path, dtype=torch.float32, device="cpu")


@pytest.mark.parametrize("method", ["awq-modules_to_not_convert", "gptq-modules_in_block_to_quantize",
                                    "gptq-dynamic-skip"])
def test_modules_left_dense_by_the_checkpoint(tmp_path, method):
    """A 4-bit checkpoint may leave modules unquantized (stored fp16). Loading must either honour that
    (the module computes with its fp16 weight) or refuse; re-quantizing it with round-to-nearest
    silently changes the model."""
    dense = ("model.layers.1.mlp.down_proj",)
    if method.startswith("awq"):
        qc, parts = awq_config(modules_to_not_convert=["model.layers.1.mlp.down_proj"]), awq_tensors
    elif method == "gptq-modules_in_block_to_quantize":
        dense = ("model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj")
        qc = gptq_config(checkpoint_format="gptq", modules_in_block_to_quantize=[
            ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
            ["mlp.gate_proj", "mlp.up_proj"]])
        parts = gptq_tensors
    else:  # GPTQModel: a "-:" rule in `dynamic` skips the matching modules
        qc, parts = gptq_config(checkpoint_format="gptq", dynamic={r"-:model\.layers\.1\.mlp\.down_proj": {}}), gptq_tensors
    hf = write_4bit_checkpoint(tmp_path, qc, parts, 128, seed=8, dense=dense)
    try:
        model = fastinfer.load_model(tmp_path, dtype=torch.float32, device="cpu").model
    except ValueError:
        return  # refused: acceptable
    assert_matches(model, hf)


def test_gptqmodel_v1_zero_points_with_borrow(tmp_path):
    """GPTQModel (what transformers 5 quantizes and loads GPTQ with) writes format "gptq" (v1) by
    subtracting 0x11111111 from each packed v2 qzeros word as one integer
    (convert_gptq_v2_to_v1_format: `qzeros -= 0b0001...0001`, "sym=False has underflow probability
    of ~<=13%") and reads it back by adding it (convert_gptq_v1_to_v2_format), so a zero point of 0
    borrows from the nibble above and round-trips exactly. Decoding nibble by nibble (+1 each)
    turns z = 0 into 16 and its upper neighbour into z - 1."""
    def gptqmodel_v1(codes, scales, zeros, group):
        parts = gptq_tensors(codes, scales, zeros, group, fmt="gptq_v2")
        words = parts["qzeros"].to(torch.int64) & 0xFFFFFFFF
        parts["qzeros"] = _int32((words - 0x11111111) % 2 ** 32)
        return parts
    hf = write_4bit_checkpoint(tmp_path, gptq_config(checkpoint_format="gptq"), gptqmodel_v1, 128, seed=16,
                               zeros="any")
    assert_matches(fastinfer.load_model(tmp_path, dtype=torch.float32, device="cpu").model, hf)


def test_gptq_zero_bias_buffers_of_a_bias_free_model(tmp_path):
    """AutoGPTQ / GPTQ-for-LLaMa QuantLinear layers saved a `bias` buffer (zeros) for every layer,
    also for bias-free Llama projections (vLLM skips them: "Skip loading extra bias for GPTQ
    models"; HF ignores them). Such a checkpoint must load."""
    def zero_biases(tensors):
        for i in range(2):
            for p in PROJECTIONS:
                rows = tensors[f"model.layers.{i}.{p}.scales"].shape[1]
                tensors[f"model.layers.{i}.{p}.bias"] = torch.zeros(rows, dtype=torch.float16)
    hf = write_4bit_checkpoint(tmp_path, gptq_config(checkpoint_format="gptq"), gptq_tensors, 128, seed=9,
                               extra=zero_biases)
    assert_matches(fastinfer.load_model(tmp_path, dtype=torch.float32, device="cpu").model, hf)


def test_gptq_k_not_a_multiple_of_the_group_is_refused_clearly(tmp_path):
    """down_proj K = 192 with group_size 128: GPTQ stores ceil(192 / 128) = 2 groups. The loader can't
    run it (K % group != 0) and must say so in terms of group_size / in_features (it does: the
    model refuses the shape before any weight is read)."""
    write_4bit_checkpoint(tmp_path, gptq_config(checkpoint_format="gptq"), gptq_tensors, 128, seed=10,
                          intermediate_size=192)
    with pytest.raises(ValueError, match="group_size|multiple"):
        fastinfer.load_model(tmp_path, dtype=torch.float32, device="cpu")


# ---- FP8 checkpoints --------------------------------------------------------------------------------

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
FP8_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CT_FP8 = {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
          "config_groups": {"group_0": {"targets": ["Linear"],
                                        "weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
                                        "input_activations": {"num_bits": 8, "type": "float", "strategy": "token",
                                                              "dynamic": True}}}}


def fp8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row e4m3 (the layout of fastinfer's FP8 linear): s = max(amax / 448, tiny), q = e4m3(w / s)."""
    s = torch.clamp(w.abs().amax(1) / FP8_MAX, min=torch.finfo(torch.float32).tiny)
    return (w / s[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), s


def write_fp8_checkpoint(path, hf, qc, convert) -> None:
    """convert(name, fp32 weight) -> the tensors a projection is stored as (None: keep it bf16)."""
    tensors = {}
    for name, t in hf.state_dict().items():
        parts = None
        if name.endswith(".weight") and name.rsplit(".", 2)[-2] in FP8_PROJ:
            parts = convert(name, t.float())
        tensors.update(parts if parts is not None else {name: t.detach().clone().contiguous()})
    path.mkdir(parents=True, exist_ok=True)
    safetensors_torch.save_file(tensors, str(path / "model.safetensors"))
    cfg = hf.config.to_dict()
    cfg["quantization_config"] = qc
    (path / "config.json").write_text(json.dumps(cfg))


def test_fp8_block_scales_on_partial_blocks(tmp_path):
    """HF fine-grained FP8 with 128 x 128 blocks on 32..160-row, 64..160-column weights: every
    scale grid has partial (cropped) blocks. Each loaded row must be the per-row e4m3 of the
    block-dequantized weight (w = q * scale_inv of its block); a single block is kept as it is."""
    hf = make_hf_model("llama", seed=11)
    gen = torch.Generator().manual_seed(11)
    expected = {}

    def blocks(name, w):
        n, k = w.shape
        scale_inv = 0.001 + 0.002 * torch.rand(-(-n // 128), -(-k // 128), generator=gen)
        full = scale_inv.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
        q = (w / full).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        # one block covering the whole weight is a per-tensor scale: exact as it is; else per-row e4m3
        expected[name] = (q, full[:, 0]) if scale_inv.numel() == 1 else fp8_rows(q.float() * full)
        return {name: q, name + "_scale_inv": scale_inv}
    write_fp8_checkpoint(tmp_path, hf, {"quant_method": "fp8", "activation_scheme": "dynamic",
                                        "weight_block_size": [128, 128]}, blocks)
    model = fastinfer.load_model(tmp_path, dtype=torch.float32, device="cpu").model
    layer, kv = model.layers[1], hf.config.num_key_value_heads * 16
    q_rows = hf.config.num_attention_heads * 16
    for name, rows in [("self_attn.k_proj", slice(q_rows, q_rows + kv)), ("mlp.gate_proj", slice(0, 160)),
                       ("mlp.down_proj", slice(None))]:
        dest = layer.down if "down" in name else layer.gate_up if "gate" in name else layer.qkv
        q, s = expected[f"model.layers.1.{name}.weight"]
        assert torch.equal(dest.weight[rows].view(torch.uint8), q.view(torch.uint8)), name
        assert torch.equal(dest.weight_scale[rows], s), name


def test_compressed_tensors_ignore_list_and_kv_cache_scheme(tmp_path):
    """compressed-tensors: a projection on the ignore list ships bf16 (quantized per row on load), the
    rest e4m3 + per-channel scales (copied as they are), static input_scale ignored, kv_cache_scheme
    k_scale / v_scale read into each layer's kv_scale."""
    hf = make_hf_model("llama", seed=12)
    qc = json.loads(json.dumps(CT_FP8))
    qc["ignore"] = ["lm_head", "model.layers.0.mlp.down_proj"]
    qc["config_groups"]["group_0"]["input_activations"].update(strategy="tensor", dynamic=False)
    qc["kv_cache_scheme"] = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False,
                             "symmetric": True}
    stored = {}

    def channel(name, w):
        if name == "model.layers.0.mlp.down_proj.weight":
            return None
        q, s = fp8_rows(w)
        stored[name] = (q, s)
        return {name: q, name + "_scale": s[:, None], name.removesuffix("weight") + "input_scale": torch.tensor([0.02])}
    write_fp8_checkpoint(tmp_path, hf, qc, channel)
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(tmp_path / "model.safetensors"))
    for i, (k, v) in enumerate([(0.5, 0.25), (0.125, 2.0)]):
        tensors[f"model.layers.{i}.self_attn.k_scale"] = torch.tensor(k)
        tensors[f"model.layers.{i}.self_attn.v_scale"] = torch.tensor(v)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    model = fastinfer.load_model(tmp_path, dtype=torch.float32, device="cpu").model
    assert model.layers[0].kv_scale.tolist() == [0.5, 0.25] and model.layers[1].kv_scale.tolist() == [0.125, 2.0]
    q, s = fp8_rows(hf.model.layers[0].mlp.down_proj.weight.detach().float())
    assert torch.equal(model.layers[0].down.weight.view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(model.layers[0].down.weight_scale, s)
    q, s = stored["model.layers.1.mlp.up_proj.weight"]
    assert torch.equal(model.layers[1].gate_up.weight[160:].view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(model.layers[1].gate_up.weight_scale[160:], s)
    assert model.lm_head.dtype == torch.float32


def test_per_head_kv_cache_scales_are_refused_clearly(tmp_path):
    """compressed-tensors kv_cache_scheme strategy "attn_head" stores one k_scale / v_scale per KV
    head. fastinfer keeps one scale per layer: such a checkpoint must be refused with a ValueError
    naming the tensor (or honoured), not crash in a reshape."""
    hf = make_hf_model("llama", seed=13)
    qc = json.loads(json.dumps(CT_FP8))
    qc["kv_cache_scheme"] = {"num_bits": 8, "type": "float", "strategy": "attn_head", "dynamic": False,
                             "symmetric": True}

    def channel(name, w):
        q, s = fp8_rows(w)
        return {name: q, name + "_scale": s[:, None]}
    write_fp8_checkpoint(tmp_path, hf, qc, channel)
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(tmp_path / "model.safetensors"))
    heads = hf.config.num_key_value_heads
    for i in range(2):
        tensors[f"model.layers.{i}.self_attn.k_scale"] = torch.full((heads, 1, 1), 0.5)
        tensors[f"model.layers.{i}.self_attn.v_scale"] = torch.full((heads, 1, 1), 0.25)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="k_scale|kv_cache_scheme|attn_head"):
        fastinfer.load_model(tmp_path, dtype=torch.float32, device="cpu")


# ---- GGUF 4-bit -------------------------------------------------------------------------------------

GGUF_DIMS = dict(layers=2, hidden=128, heads=2, kv_heads=1, head_dim=64, ffn=256)
_GGUF_LAYER = [("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm"),
               ("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
               ("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
               ("mlp.down_proj", "ffn_down")]


def _gguf_tokens() -> list[str]:
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    extra = iter(range(256, 512))
    return ["<s>", "</s>"] + [chr(b) if b in keep else chr(next(extra)) for b in range(256)] + \
        ["Ġt", "he"] + [f"tok{i}" for i in range(60)]  # 320 tokens


def _to_gguf_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute: HF q / k rows -> llama.cpp's interleaved order."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)


# Qwen3 at head_dim 128: transformers' GGUF reader leaves Qwen3Config's default head_dim (128), so
# its cross-check needs that size.
QWEN3_GGUF_DIMS = dict(layers=2, hidden=256, heads=2, kv_heads=1, head_dim=128, ffn=256)


def write_gguf_llama(path, qtypes, tied: bool = False, seed: int = 0, arch: str = "llama", bias: bool = False):
    """A 2-layer GGUF of `arch` (llama, qwen2, qwen3) as llama.cpp's converter writes it, projection i
    stored as qtypes(name); returns the HF state dict of the values the file holds (gguf.quants.dequantize
    of the stored blocks, rows in HF order). Qwen2 always has q / k / v biases, Qwen3 q / k / v / o ones
    when `bias`, and q / k head norms; only llama's q / k rows are interleaved."""
    gguf = pytest.importorskip("gguf")
    d, gen = (QWEN3_GGUF_DIMS if arch == "qwen3" else GGUF_DIMS), torch.Generator().manual_seed(seed)
    tokens = _gguf_tokens()
    h, f, hd = d["hidden"], d["ffn"], d["head_dim"]
    shapes = {"self_attn.q_proj": (d["heads"] * hd, h), "self_attn.k_proj": (d["kv_heads"] * hd, h),
              "self_attn.v_proj": (d["kv_heads"] * hd, h), "self_attn.o_proj": (h, d["heads"] * hd),
              "mlp.gate_proj": (f, h), "mlp.up_proj": (f, h), "mlp.down_proj": (h, f)}
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(d["layers"])
    if arch == "qwen3":
        writer.add_key_length(hd)
        writer.add_value_length(hd)
    writer.add_context_length(256)
    writer.add_embedding_length(h)
    writer.add_feed_forward_length(f)
    writer.add_head_count(d["heads"])
    writer.add_head_count_kv(d["kv_heads"])
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default" if arch == "llama" else "qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3] + [1] * (len(tokens) - 2))
    writer.add_token_merges(["Ġ t", "h e"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    state = {"model.embed_tokens.weight": 0.5 * torch.randn(len(tokens), h, generator=gen),
             "model.norm.weight": 1 + 0.1 * torch.randn(h, generator=gen)}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"].numpy())
    writer.add_tensor("output_norm.weight", state["model.norm.weight"].numpy())
    if not tied:
        state["lm_head.weight"] = 0.5 * torch.randn(len(tokens), h, generator=gen)
        writer.add_tensor("output.weight", state["lm_head.weight"].numpy())
    for i in range(d["layers"]):
        for ours, theirs in _GGUF_LAYER:
            name, gname = f"model.layers.{i}.{ours}.weight", f"blk.{i}.{theirs}.weight"
            if "norm" in ours:
                state[name] = 1 + 0.1 * torch.randn(h, generator=gen)
                writer.add_tensor(gname, state[name].numpy())
                continue
            w = 0.2 * torch.randn(*shapes[ours], generator=gen)
            biased = (arch == "qwen2" and theirs in ("attn_q", "attn_k", "attn_v")) or (arch == "qwen3" and bias
                                                                                     and theirs.startswith("attn_"))
            if biased:
                state[f"model.layers.{i}.{ours}.bias"] = 0.1 * torch.randn(shapes[ours][0], generator=gen)
                writer.add_tensor(f"blk.{i}.{theirs}.bias", state[f"model.layers.{i}.{ours}.bias"].numpy())
            if arch == "qwen3" and theirs in ("attn_q", "attn_k"):
                norm = 1 + 0.2 * torch.randn(hd, generator=gen)
                state[f"model.layers.{i}.{ours.replace('_proj', '_norm')}.weight"] = norm
                writer.add_tensor(f"blk.{i}.{theirs}_norm.weight", norm.numpy())
            heads = {"attn_q": d["heads"], "attn_k": d["kv_heads"]}.get(theirs) if arch == "llama" else None
            stored = _to_gguf_rows(w, heads) if heads else w
            kind = gguf.GGMLQuantizationType[qtypes(name)]
            blocks = gguf.quants.quantize(stored.numpy(), kind)
            writer.add_tensor(gname, blocks, raw_dtype=kind)
            values = torch.from_numpy(np.array(gguf.quants.dequantize(blocks, kind), dtype=np.float32)).reshape(w.shape)
            if heads:  # back to HF's row order (inverse of _to_gguf_rows)
                values = values.reshape(heads, w.shape[0] // heads // 2, 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)
            state[name] = values
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return state


def hf_from_state(state: dict, tied: bool, arch: str = "llama", bias: bool = False):
    d = QWEN3_GGUF_DIMS if arch == "qwen3" else GGUF_DIMS
    name = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3"}[arch]
    cfg = getattr(transformers, f"{name}Config")(
        vocab_size=320, hidden_size=d["hidden"], intermediate_size=d["ffn"], num_hidden_layers=2,
        num_attention_heads=d["heads"], num_key_value_heads=d["kv_heads"], head_dim=d["head_dim"],
        max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=tied,
        **({"attention_bias": bias} if arch == "qwen3" else {}))
    hf = getattr(transformers, f"{name}ForCausalLM")(cfg).eval()
    missing = set(hf.state_dict()) - set(state) - ({"lm_head.weight"} if tied else set())
    assert not missing, missing
    hf.load_state_dict(state, strict=False)
    if tied:
        hf.tie_weights()
    return hf


@pytest.mark.parametrize("case", ["q4_0", "q4_0-tied", "mixed"])
def test_gguf_q4_runs_4bit_and_matches_its_blocks(tmp_path, case):
    """quantization="gguf": Q4_0 (symmetric), Q4_0 + Q4_1 mixed (mins), tied output (no output.weight)."""
    tied = case.endswith("tied")
    qtypes = (lambda n: "Q4_1" if "mlp" in n else "Q4_0") if case == "mixed" else (lambda n: "Q4_0")
    state = write_gguf_llama(tmp_path / "m.gguf", qtypes, tied=tied, seed=14)
    loaded = fastinfer.load_model(tmp_path / "m.gguf", dtype=torch.float32, device="cpu", quantization="gguf")
    model = loaded.model
    assert model.quant.method == "gguf" and model.quant.mode == ("mins" if case == "mixed" else "symmetric")
    assert model.config.tie_word_embeddings is tied
    torch.testing.assert_close(run_logits(model), hf_logits(hf_from_state(state, tied)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch, bias", [("qwen2", True), ("qwen3", False), ("qwen3", True)],
                         ids=["qwen2", "qwen3", "qwen3-bias"])
def test_gguf_qwen_runs_4bit_and_dequantized(tmp_path, arch, bias):
    """Qwen2 / Qwen3 GGUFs (rows as HF has them, biases and Qwen3's q / k head norms as F32 tensors):
    quantization="gguf" runs the Q4 projections as 4-bit, the plain load dequantizes them; both give
    the logits of HF's class on the values the file holds; the tokenizer takes the qwen2 pre-tokenizer."""
    state = write_gguf_llama(tmp_path / "m.gguf", lambda n: "Q4_1" if "mlp" in n else "Q4_0", tied=arch == "qwen3",
                             seed=16, arch=arch, bias=bias)
    hf = hf_logits(hf_from_state(state, arch == "qwen3", arch, bias))
    four_bit = fastinfer.load_model(tmp_path / "m.gguf", dtype=torch.float32, device="cpu", quantization="gguf")
    assert four_bit.model.config.architecture == f"Qwen{arch[-1]}ForCausalLM" and four_bit.model.quant.mode == "mins"
    assert (four_bit.model.layers[0].o_proj.bias is not None) == (arch == "qwen3" and bias)
    torch.testing.assert_close(run_logits(four_bit.model), hf, rtol=1e-4, atol=1e-4)
    dense = fastinfer.load_model(tmp_path / "m.gguf", dtype=torch.float32, device="cpu")
    assert dense.model.quant is None
    torch.testing.assert_close(run_logits(dense.model), hf, rtol=1e-4, atol=1e-4)
    assert dense.tokenizer.decode(dense.tokenizer("the tt")["input_ids"]) == "the tt"


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_gguf_logits_match_transformers_gguf_reader(tmp_path, arch):
    """An independent reading of the same file: transformers' own GGUF loader (its tensor renames and
    llama's q / k un-permutation) gives the logits fastinfer's dequantized load gives."""
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    # (transformers reads no attention_bias for a Qwen3 GGUF: its biased variant is checked above only)
    write_gguf_llama(tmp_path / "m.gguf", lambda n: "Q8_0", seed=17, arch=arch)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf",
                                                               dtype=torch.float32).eval()
    ours = fastinfer.load_model(tmp_path / "m.gguf", dtype=torch.float32, device="cpu").model
    torch.testing.assert_close(run_logits(ours), hf_logits(theirs), rtol=1e-4, atol=1e-4)


def test_gguf_other_projection_types_refused_for_gguf_but_dequantized_otherwise(tmp_path):
    state = write_gguf_llama(tmp_path / "m.gguf", lambda n: "Q5_0" if "layers.1.mlp.up" in n else "Q4_0", seed=15)
    with pytest.raises(ValueError, match="Q5_0"):
        fastinfer.load_model(tmp_path / "m.gguf", dtype=torch.float32, device="cpu", quantization="gguf")
    model = fastinfer.load_model(tmp_path / "m.gguf", dtype=torch.float32, device="cpu").model
    assert model.quant is None
    torch.testing.assert_close(run_logits(model), hf_logits(hf_from_state(state, False)), rtol=1e-4, atol=1e-4)
