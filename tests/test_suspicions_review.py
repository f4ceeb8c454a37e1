"""Review of four suspected bugs (each test asserts real values and fails on the code it was written against
where the suspicion held):

1. 4-bit group parameters (scales / zeros / mins) of a checkpoint rounded through bf16 in an fp16 / fp32
   model: refuted, the tests pin that they arrive bit-exact.
2. Speculative decoding with a draft model: siblings of an n > 1 request drew their proposals from one
   seed; DraftModelProposer.generators grew by one entry per sequence, never pruned.
3. SpecStats counted proposals accepted (and tokens "emitted") past the point where the sequence stopped.
4. FP8: an FP8-quantized lm_head was refused (with a hint to do what the user did: quantization='fp8'), and
   compressed-tensors configs that quantize only the KV cache were refused.
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import fastinfer
from fastinfer.quant.int4 import PackedInt4, unpack
from fastinfer.sampling_params import SamplingParams
from fastinfer.sequence import Sequence

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from test_quant_parity import (CT_FP8, FP8, awq_config, awq_tensors, fp8_rows, gptq_config,  # noqa: E402
                               gptq_tensors, hf_logits, run_logits, write_4bit_checkpoint, write_fp8_checkpoint,
                               write_gguf_llama)
from test_spec_edge_cases import GREEDY, CharTokenizer, draft, make_engine, repetitive, run, spec_cfg, target  # noqa: E402,F401
from models import make_hf_model  # noqa: E402


# ================================================================================================
# 1. 4-bit group parameters keep the checkpoint's fp16 values in fp16 and fp32 models
# ================================================================================================
def _logical(lin):
    return unpack(PackedInt4(lin.qweight, lin.scales, lin.quant.group_size, lin.zeros, lin.mins))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_checkpoint_group_params_are_not_rounded_through_bf16(tmp_path, method, dtype):
    qc, parts = (gptq_config(), gptq_tensors) if method == "gptq" else (awq_config(), awq_tensors)
    write_4bit_checkpoint(tmp_path, qc, parts, 128, seed=31)
    stored = safetensors_torch.load_file(str(tmp_path / "model.safetensors"))
    model = fastinfer.load_model(tmp_path, dtype=dtype, device="cpu").model
    lin = model.layers[1].o_proj
    assert lin.scales.dtype == dtype
    scales = stored["model.layers.1.self_attn.o_proj.scales"].t()  # fp16 [N, G]
    assert scales.dtype == torch.float16
    got = _logical(lin)
    assert torch.equal(got.scales.to(torch.float64), scales.to(torch.float64))
    # the values do not survive a bf16 round trip, so the equality above would catch one
    assert not torch.equal(scales.to(torch.bfloat16).to(torch.float64), scales.to(torch.float64))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_gguf_q4_1_scales_and_mins_are_exact(tmp_path, dtype):
    pytest.importorskip("gguf")
    from fastinfer.loader.gguf import gguf_config, hf_tensor_map, open_gguf
    from fastinfer.quant.gguf import q4_weight
    write_gguf_llama(tmp_path / "m.gguf", lambda n: "Q4_1", seed=32)
    model = fastinfer.load_model(tmp_path / "m.gguf", dtype=dtype, device="cpu", quantization="gguf").model
    assert model.quant.mode == "mins"
    got = _logical(model.layers[0].down)
    file = open_gguf(tmp_path / "m.gguf")
    ref = q4_weight(hf_tensor_map(file, gguf_config(file, dtype))["model.layers.0.mlp.down_proj.weight"])
    assert ref.scales.dtype == torch.float16
    assert torch.equal(got.codes, ref.codes)
    assert torch.equal(got.scales.double(), ref.scales.double())
    assert torch.equal(got.mins.double(), ref.mins.double())


# ================================================================================================
# 2. draft-model proposer: one stream per sibling, no per-sequence state left when requests finish
# ================================================================================================
def test_siblings_of_a_seeded_request_get_distinct_draft_streams(target):
    """The draft proposes with each sequence's own TokenStream (sampling.py): siblings of a seeded
    request carry distinct child seeds, so their streams differ; the same (seed, index) gives the same
    stream again."""
    from fastinfer.engine import _child_seed
    from fastinfer.sampling import make_stream
    seed = 123
    streams = [make_stream(seed if i == 0 else _child_seed(seed, i), "cpu") for i in range(3)]
    draws = [torch.rand(8, generator=s.at(5)) for s in streams]
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    assert not torch.equal(draws[1], draws[2])
    twin = make_stream(_child_seed(seed, 1), "cpu")
    assert torch.equal(torch.rand(8, generator=twin.at(5)), draws[1])


def test_seeded_n_completions_with_a_draft_model_are_reproducible_and_distinct(target, draft):
    prompt = repetitive(1, seed=33)[0]
    params = SamplingParams(n=3, max_tokens=10, temperature=1.2, seed=9, ignore_eos=True)
    a, _ = run(target, [prompt], params, spec_cfg("draft", target, draft))
    b, _ = run(target, [prompt], params, spec_cfg("draft", target, draft))
    assert a == b
    assert len({tuple(c[0]) for c in a[0]}) == 3


@pytest.mark.parametrize("seeded", [True, False])
def test_draft_generators_are_released_when_requests_finish(target, draft, seeded):
    engine = make_engine(target, spec_cfg("draft", target, draft, k=3))
    prompts = repetitive(6, seed=34)
    for round_ in range(3):
        for i, p in enumerate(prompts):
            sp = SamplingParams(n=2 if i % 3 == 0 else 1, max_tokens=6, temperature=0.8,
                                seed=(100 * round_ + i) if seeded else None, ignore_eos=True)
            engine.add_request(f"{round_}-{i}", p, sp)
        engine.add_request(f"{round_}-abort", prompts[0], SamplingParams(max_tokens=20, seed=1 if seeded else None))
        engine.step()
        engine.step()
        engine.step()
        engine.abort(f"{round_}-abort")
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    engine.pop_finished(out.request_id)
        engine.pop_finished(f"{round_}-abort")
        assert engine.spec_stats.num_proposed > 0
        # the proposer keeps no per-sequence state (its sampling uses each sequence's own stream)
        assert not [v for v in vars(engine.proposer).values() if isinstance(v, dict) and v]
    assert engine.blocks.num_in_use == 0


# ================================================================================================
# 3. spec statistics stop where the sequence stopped
# ================================================================================================
def _verify_step_tokens(engine, outputs) -> int:
    """Tokens appended by verify steps: all output tokens but each sequence's first (sampled at prefill)."""
    return sum(len(c[0]) - 1 for per_prompt in outputs for c in per_prompt)


def test_spec_stats_do_not_count_tokens_past_a_stop_token(target, draft):
    prompts = repetitive(4, seed=3)
    free, _ = run(target, prompts, SamplingParams(max_tokens=24, **GREEDY))
    params = [SamplingParams(max_tokens=24, stop_token_ids=[c[0][0][j]], **GREEDY)
              for c, j in zip(free, (2, 5, 7, 9))]
    got, engine = run(target, prompts, params, spec_cfg("self", target, draft, k=4))
    assert all(c[0][2] == "stop" for c in got)
    stats = engine.spec_stats
    appended = _verify_step_tokens(engine, got)
    assert stats.num_emitted == appended, (stats, appended)
    assert stats.num_accepted <= stats.num_proposed
    assert stats.acceptance_rate == 1.0  # draft == target: everything it proposed before the stop
    assert stats.num_accepted <= appended


def test_spec_stats_with_eos_inside_accepted_runs(target, draft):
    """EOS inside an accepted run (engine.eos_ids): no step counts more tokens than the sequence took."""
    prompts = repetitive(4, seed=4)
    free, _ = run(target, prompts, SamplingParams(max_tokens=20, **GREEDY))
    eos = {c[0][0][4] for c in free}
    params = SamplingParams(max_tokens=20, temperature=0.0)
    for kind in ("self", "ngram", "draft"):
        got, engine = run(target, prompts, params, spec_cfg(kind, target, draft), eos=eos)
        stats = engine.spec_stats
        appended = _verify_step_tokens(engine, got)
        # ngram / draft: some steps may decode without proposals; self: every step after the first verifies
        assert stats.num_emitted == appended if kind == "self" else stats.num_emitted <= appended, (kind, stats)
        assert stats.num_accepted <= stats.num_proposed and stats.num_accepted <= stats.num_emitted, kind
        if kind == "self":
            assert stats.acceptance_rate == 1.0


def test_spec_stats_with_a_stop_string_inside_an_accepted_run(target, draft):
    tok_target = dataclasses.replace(target, tokenizer=CharTokenizer())
    prompts = ["abcabcabcabc", "hellohellohello", "zzyzzyzzy"]
    free, _ = run(tok_target, prompts, SamplingParams(max_tokens=16, **GREEDY))
    params = [SamplingParams(max_tokens=16, stop=[c[0][1][j:j + 2]], **GREEDY) for c, j in zip(free, (1, 4, 6))]
    got, engine = run(tok_target, prompts, params, spec_cfg("self", tok_target, draft))
    assert all(c[0][2] == "stop" for c in got)
    stats = engine.spec_stats
    assert stats.num_emitted == _verify_step_tokens(engine, got), stats
    assert stats.acceptance_rate == 1.0


# ================================================================================================
# 4. FP8: a quantized lm_head, KV-cache-only compressed-tensors
# ================================================================================================
def _ct_channel(name, w):
    q, s = fp8_rows(w)
    return {name: q, name + "_scale": s[:, None]}


@pytest.mark.parametrize("scale_layout", ["channel", "tensor", "block"])
@pytest.mark.parametrize("head_first", [False, True])
def test_fp8_quantized_lm_head_is_dequantized(tmp_path, scale_layout, head_first):
    """compressed-tensors with lm_head not ignored (or HF fp8 without it in modules_to_not_convert):
    lm_head.weight e4m3 + its scale. fastinfer keeps the head dense: it must hold q * scale exactly,
    with quantization=None (the checkpoint's) and quantization='fp8' (LLM's argument) alike."""
    hf = make_hf_model("llama", seed=35)
    qc = json.loads(json.dumps(CT_FP8))
    qc["ignore"] = []
    write_fp8_checkpoint(tmp_path, hf, qc, _ct_channel)
    tensors = safetensors_torch.load_file(str(tmp_path / "model.safetensors"))
    w = tensors.pop("lm_head.weight").float()
    gen = torch.Generator().manual_seed(35)
    if scale_layout == "channel":
        q, s = fp8_rows(w)
        head = {"lm_head.weight": q, "lm_head.weight_scale": s[:, None]}
        want = q.float() * s[:, None]
    elif scale_layout == "tensor":
        s = w.abs().max() / 448.0
        q = (w / s).to(FP8)
        head = {"lm_head.weight": q, "lm_head.weight_scale": s.reshape(1)}
        want = q.float() * s
    else:  # HF fine-grained: weight_scale_inv per 128 x 128 block (320 x 64 -> 3 x 1, the last one partial)
        qc = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
        scale_inv = 0.002 + 0.002 * torch.rand(3, 1, generator=gen)
        full = scale_inv.repeat_interleave(128, 0)[:w.shape[0]]
        q = (w / full).clamp(-448, 448).to(FP8)
        head = {"lm_head.weight": q, "lm_head.weight_scale_inv": scale_inv}
        want = q.float() * full
    ordered = {**head, **tensors} if head_first else {**tensors, **head}
    safetensors_torch.save_file(ordered, str(tmp_path / "model.safetensors"))
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = qc
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    for quantization in (None, "fp8"):
        model = fastinfer.load_model(tmp_path, dtype=torch.float32, device="cpu", quantization=quantization).model
        assert model.quantization == "fp8"
        assert model.lm_head.dtype == torch.float32
        assert torch.equal(model.lm_head, want), quantization
    llm = fastinfer.LLM(str(tmp_path), quantization="fp8", dtype=torch.float32, device="cpu", num_blocks=16)
    out = llm.generate([[5, 17, 33]], SamplingParams(max_tokens=3, temperature=0.0))
    assert len(out[0].outputs[0].token_ids) == 3


def test_fp8_lm_head_without_its_scale_is_a_clear_error(tmp_path):
    hf = make_hf_model("llama", seed=36)
    qc = json.loads(json.dumps(CT_FP8))
    qc["ignore"] = []
    write_fp8_checkpoint(tmp_path, hf, qc, _ct_channel)
    tensors = safetensors_torch.load_file(str(tmp_path / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["lm_head.weight"].to(FP8)
    safetensors_torch.save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="lm_head.*scale") as err:
        fastinfer.load_model(tmp_path, dtype=torch.float32, device="cpu", quantization="fp8")
    assert "quantization='fp8'" not in str(err.value)


KV_ONLY = {"quant_method": "compressed-tensors", "format": "dense", "config_groups": {}, "ignore": [],
           "quantization_status": "compressed",
           "kv_cache_scheme": {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False,
                               "symmetric": True}}


def _write_kv_only(path, hf, qc):
    tensors = {n: t.detach().clone().contiguous() for n, t in hf.state_dict().items()}
    for i, (k, v) in enumerate([(0.5, 0.25), (0.125, 2.0)]):
        tensors[f"model.layers.{i}.self_attn.k_scale"] = torch.tensor(k)
        tensors[f"model.layers.{i}.self_attn.v_scale"] = torch.tensor(v)
    path.mkdir(parents=True, exist_ok=True)
    safetensors_torch.save_file(tensors, str(path / "model.safetensors"))
    cfg = hf.config.to_dict()
    cfg["quantization_config"] = qc
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("groups", ["empty", "absent"])
def test_kv_cache_only_compressed_tensors_loads_dense_with_its_kv_scales(tmp_path, groups):
    hf = make_hf_model("llama", seed=37)
    qc = json.loads(json.dumps(KV_ONLY))
    if groups == "absent":
        del qc["config_groups"]
    _write_kv_only(tmp_path, hf, qc)
    model = fastinfer.load_model(tmp_path, dtype=torch.float32, device="cpu").model
    assert model.quantization is None and model.quant is None
    assert model.layers[0].kv_scale.tolist() == [0.5, 0.25] and model.layers[1].kv_scale.tolist() == [0.125, 2.0]
    torch.testing.assert_close(run_logits(model), hf_logits(hf), rtol=1e-4, atol=1e-4)
    fp8 = fastinfer.load_model(tmp_path, dtype=torch.float32, device="cpu", quantization="fp8").model
    assert fp8.quantization == "fp8" and fp8.layers[1].kv_scale.tolist() == [0.125, 2.0]
    llm = fastinfer.LLM(str(tmp_path), dtype=torch.float32, device="cpu", num_blocks=16, kv_cache_dtype="fp8")
    out = llm.generate([[5, 17, 33]], SamplingParams(max_tokens=3, temperature=0.0))
    assert len(out[0].outputs[0].token_ids) == 3


@pytest.mark.parametrize("change,match", [
    (lambda qc: qc.pop("kv_cache_scheme"), "config_groups"),
    (lambda qc: qc["kv_cache_scheme"].update(type="int"), "kv_cache_scheme"),
])
def test_compressed_tensors_without_anything_to_load_is_still_refused(tmp_path, change, match):
    hf = make_hf_model("llama", seed=38)
    qc = json.loads(json.dumps(KV_ONLY))
    change(qc)
    _write_kv_only(tmp_path, hf, qc)
    with pytest.raises(ValueError, match=match):
        fastinfer.load_model(tmp_path, dtype=torch.float32, device="cpu")
