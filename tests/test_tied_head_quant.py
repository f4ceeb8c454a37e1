"""Tied word embeddings (tie_word_embeddings=True: SmolLM2, Llama-3.2-1B) under FP8 and 4-bit loading.

With tied embeddings the LM head IS the embedding matrix, in the model dtype: quantizing the
projections (quantization="fp8" / "int4", or an FP8 / GPTQ / AWQ checkpoint) must leave it alone.
A checkpoint that explicitly stores an lm_head (dense, FP8 e4m3 + scale, or 4-bit) is used as
stored, dequantized, as transformers 5 uses a stored lm_head of a tied config (with a warning that
the head is no longer the embedding); one equal to the embedding keeps them tied, and one stored
without the embedding fills it. Broken pieces (an FP8 head without its scale, a scale without its
weight, a scale of the wrong shape) are clear errors naming the tensor.

References: HF transformers with the same weights, its projections emulating fastinfer's FP8
(tests/test_fp8_model.py) or holding the dequantized 4-bit weights (tests/test_quant_parity.py).
"""
from __future__ import annotations

import json
import warnings

import pytest
import torch

import fastinfer
from fastinfer.quant.linear import Int4Linear
from fastinfer.sampling_params import SamplingParams

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

import reference as ref  # noqa: E402
from models import make_hf_model  # noqa: E402
from test_fp8_model import (CT_CONFIG, block_scales, channel_scales, emulate_fp8_linears,  # noqa: E402
                            fastinfer_logits, fp8_tensors, hf_logits, tensor_scales, write_checkpoint)
from test_quant_loaders import PROJECTIONS, SHAPE  # noqa: E402
from test_quant_parity import (awq_config, awq_tensors, dequantize_4bit, gptq_config, gptq_tensors,  # noqa: E402
                               random_4bit, run_logits, write_4bit_checkpoint)

FP8 = torch.float8_e4m3fn
PROMPT = [5, 17, 3, 99, 42, 8, 250, 31, 7, 64, 12, 5, 77]
HF_FP8 = {"quant_method": "fp8", "activation_scheme": "dynamic"}
UNTIED_WARNING = "tie_word_embeddings"


# ---- helpers ----------------------------------------------------------------------------------------

def tied_model(seed: int = 0, variant: str = "llama-tied", **shape):
    hf = make_hf_model(variant, seed=seed, **({"tie_word_embeddings": True} | shape))
    assert hf.lm_head.weight is hf.model.embed_tokens.weight
    return hf


def drop_head(tensors: dict) -> None:
    """What save_pretrained writes for a tied model: no lm_head.weight."""
    tensors.pop("lm_head.weight")


def hf_reference(tied_hf, head: torch.Tensor | None = None, embed: torch.Tensor | None = None, fp8: bool = True):
    """An HF model with tied_hf's weights, its LM head `head` (untied) or the embedding (tied), the
    embedding `embed` if given; FP8-emulating projections when fp8."""
    state = {k: v.detach().clone() for k, v in tied_hf.state_dict().items()}
    if embed is not None:
        state["model.embed_tokens.weight"] = embed.clone()
    cfg = tied_hf.config.to_dict()
    cfg["tie_word_embeddings"] = head is None
    out = type(tied_hf)(type(tied_hf.config).from_dict(cfg)).eval()
    state["lm_head.weight"] = head.clone() if head is not None else state["model.embed_tokens.weight"]
    out.load_state_dict(state)
    if head is None:
        out.tie_weights()
        assert torch.equal(out.lm_head.weight, out.model.embed_tokens.weight)
    else:
        assert torch.equal(out.lm_head.weight, head) and not torch.equal(out.lm_head.weight, out.model.embed_tokens.weight)
    if fp8:
        emulate_fp8_linears(out)
    return out


def assert_fp8_close(ours: torch.Tensor, hf_emulated, hf_float) -> None:
    """fastinfer's FP8 logits equal the fp8-emulating reference to far better than the quantization error."""
    expected, unquantized = hf_logits(hf_emulated), hf_logits(hf_float)
    quant_err = (expected - unquantized).abs().max().item()
    err = (ours - expected).abs().max().item()
    assert 0 < quant_err and err <= 0.01 * quant_err, (err, quant_err)


def hf_greedy(hf, ids: list[int], n: int) -> list[int]:
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[-n:]


def fastinfer_greedy(path, n: int, **kw) -> list[int]:
    llm = fastinfer.LLM(str(path), dtype=torch.float32, device="cpu", num_blocks=16, **kw)
    out = llm.generate([PROMPT], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), use_tqdm=False)
    return list(out[0].outputs[0].token_ids)


def load(path, quantization=None, dtype=torch.float32, expect_untie: bool = False):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = fastinfer.load_model(path, dtype=dtype, device="cpu", quantization=quantization).model
    untie = [w for w in caught if UNTIED_WARNING in str(w.message) and "lm_head" in str(w.message)]
    assert bool(untie) == expect_untie, [str(w.message) for w in caught]
    return model


def assert_tied(model, embed: torch.Tensor) -> None:
    assert model.lm_head is model.embed, "the LM head must be the embedding matrix"
    assert model.embed.dtype == model.dtype
    assert torch.equal(model.embed, embed.to(model.dtype))


def edit_safetensors(path, edit) -> None:
    tensors = safetensors_torch.load_file(str(path / "model.safetensors"))
    tensors = edit(tensors) or tensors
    safetensors_torch.save_file(tensors, str(path / "model.safetensors"))


def fp8_head(w: torch.Tensor, layout: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """lm_head stored FP8 in a layout: (its tensors, the values they mean q * scale, fp32)."""
    if layout == "channel":  # compressed-tensors per channel, with a static input scale
        q, s = ref.fp8_quantize(w, ref.fp8_dynamic_scale(w, dim=1)[:, None]), ref.fp8_dynamic_scale(w, dim=1)
        return ({"lm_head.weight": q, "lm_head.weight_scale": s[:, None], "lm_head.input_scale": torch.tensor(0.1)},
                q.float() * s[:, None])
    if layout == "tensor":  # AutoFP8 / HF fp8 per tensor
        s = ref.fp8_dynamic_scale(w, dim=None)
        q = ref.fp8_quantize(w, s)
        return {"lm_head.weight": q, "lm_head.weight_scale": s.reshape(1)}, q.float() * s
    # HF fine-grained: weight_scale_inv per 128 x 128 block (320 x 64 -> 3 x 1, the last one partial)
    scale_inv = 0.002 + 0.002 * torch.rand(3, 1, generator=torch.Generator().manual_seed(1))
    full = scale_inv.repeat_interleave(128, 0)[:w.shape[0]]
    q = (w / full).clamp(-448, 448).to(FP8)
    return {"lm_head.weight": q, "lm_head.weight_scale_inv": scale_inv}, q.float() * full


# ---- (1) a float tied checkpoint quantized on load ----------------------------------------------------

@pytest.mark.parametrize("source", ["save_pretrained", "state_dict", "hf_object"])
@pytest.mark.parametrize("variant", ["llama-tied", "qwen2"])
def test_bf16_tied_checkpoint_quantized_to_fp8_keeps_the_embedding_as_head(tmp_path, source, variant):
    hf = tied_model(1, variant)
    if source == "hf_object":
        model = fastinfer.load_model(hf, dtype=torch.float32, device="cpu", quantization="fp8").model
    else:  # save_pretrained leaves lm_head.weight out; a raw state dict holds it (equal to the embedding)
        write_checkpoint(tmp_path, hf, edit=drop_head if source == "save_pretrained" else None)
        model = load(tmp_path, "fp8")
    assert model.quantization == "fp8" and model.layers[0].qkv.weight.dtype == FP8
    assert_tied(model, hf.model.embed_tokens.weight.detach())
    assert_fp8_close(run_logits(model, PROMPT), hf_reference(hf), hf)


def test_bf16_tied_checkpoint_quantized_to_fp8_in_bfloat16(tmp_path):
    hf = tied_model(2)
    hf.to(torch.bfloat16)
    write_checkpoint(tmp_path, hf, edit=drop_head)
    model = load(tmp_path, "fp8", dtype=torch.bfloat16)
    assert_tied(model, hf.model.embed_tokens.weight.detach())
    assert model.lm_head.dtype == torch.bfloat16 and model.layers[1].down.weight.dtype == FP8
    assert torch.isfinite(run_logits(model, PROMPT)).all()


def test_bf16_tied_checkpoint_fp8_greedy_matches_hf(tmp_path):
    hf = tied_model(3)
    write_checkpoint(tmp_path, hf, edit=drop_head)
    assert fastinfer_greedy(tmp_path, 8, quantization="fp8") == hf_greedy(hf_reference(hf), PROMPT, 8)


def test_bf16_tied_checkpoint_int4_keeps_a_dense_embedding_head():
    hf = tied_model(4, **SHAPE)
    model = fastinfer.load_model(hf, dtype=torch.float32, device="cpu", quantization="int4").model
    assert isinstance(model.layers[0].qkv, Int4Linear)
    assert_tied(model, hf.model.embed_tokens.weight.detach())
    from fastinfer.quant.int4 import quantize_rtn
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if name.endswith(tuple(f"{p}.weight" for p in PROJECTIONS)):
                param.copy_(quantize_rtn(param, 128, "zeros").dequantize())
    torch.testing.assert_close(run_logits(model, PROMPT), hf_logits(hf), rtol=1e-4, atol=1e-4)


# ---- (2) an FP8 checkpoint of a tied model, no lm_head.weight ------------------------------------------

FP8_LAYOUTS = {
    "ct-channel": (CT_CONFIG, channel_scales),
    "ct-tensor": ({**CT_CONFIG, "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
        "num_bits": 8, "type": "float", "strategy": "tensor"}}}}, tensor_scales),
    "hf-fp8-block": ({**HF_FP8, "weight_block_size": [32, 32]}, block_scales),
}


@pytest.mark.parametrize("layout", list(FP8_LAYOUTS))
@pytest.mark.parametrize("quantization", [None, "fp8"])
def test_fp8_tied_checkpoint_without_lm_head(tmp_path, layout, quantization):
    hf = tied_model(5)
    qc, scales = FP8_LAYOUTS[layout]

    def edit(t):
        drop_head(t)
        fp8_tensors(t, scales)
    write_checkpoint(tmp_path / "ckpt", hf, qc, edit)
    model = load(tmp_path / "ckpt", quantization)
    assert model.quantization == "fp8"
    assert_tied(model, hf.model.embed_tokens.weight.detach())
    ours = run_logits(model, PROMPT)
    if layout == "ct-channel":  # the same bits as quantizing the float checkpoint on load
        write_checkpoint(tmp_path / "bf16", hf, edit=drop_head)
        assert torch.equal(ours, fastinfer_logits(fastinfer.load_model(tmp_path / "bf16", torch.float32, "cpu", "fp8")))
        assert_fp8_close(ours, hf_reference(hf), hf)
    else:  # other scales than per channel: close to the per-channel reference
        expected, unquantized = hf_logits(hf_reference(hf)), hf_logits(hf)
        assert (ours - expected).abs().max() < 2 * (expected - unquantized).abs().max() + 1e-3


@pytest.mark.parametrize("stored", ["dense", "fp8-channel", "fp8-block"])
def test_fp8_tied_checkpoint_storing_the_shared_matrix_only_as_lm_head(tmp_path, stored):
    """No model.embed_tokens.weight: the stored lm_head is the shared matrix (dequantized when FP8),
    as HF's tie fills the embedding from it."""
    hf = tied_model(6)
    w = hf.model.embed_tokens.weight.detach().float()
    head, want = ({"lm_head.weight": w.clone()}, w) if stored == "dense" else fp8_head(w, stored.split("-")[1])

    def edit(t):
        drop_head(t)
        t.pop("model.embed_tokens.weight")
        fp8_tensors(t, channel_scales)
        t.update(head)
    qc = {**HF_FP8, "weight_block_size": [128, 128]} if stored == "fp8-block" else CT_CONFIG
    write_checkpoint(tmp_path, hf, qc, edit)
    model = load(tmp_path)
    assert_tied(model, want)
    assert_fp8_close(run_logits(model, PROMPT), hf_reference(hf, embed=want), hf_reference(hf, embed=want, fp8=False))


# ---- (3) a tied FP8 checkpoint that stores an lm_head -------------------------------------------------

@pytest.mark.parametrize("quantization", [None, "fp8"])
def test_fp8_tied_checkpoint_with_a_dense_lm_head_equal_to_the_embedding_stays_tied(tmp_path, quantization):
    hf = tied_model(7)
    write_checkpoint(tmp_path, hf, CT_CONFIG, lambda t: fp8_tensors(t, channel_scales))  # lm_head.weight kept
    model = load(tmp_path, quantization)
    assert_tied(model, hf.model.embed_tokens.weight.detach())
    assert_fp8_close(run_logits(model, PROMPT), hf_reference(hf), hf)


def test_fp8_tied_checkpoint_with_a_distinct_dense_lm_head_uses_it(tmp_path):
    """transformers 5 uses a stored lm_head that differs from the embedding of a tied config (and warns)."""
    hf = tied_model(8)
    head = 0.5 * torch.randn(hf.lm_head.weight.shape, generator=torch.Generator().manual_seed(8))

    def edit(t):
        fp8_tensors(t, channel_scales)
        t["lm_head.weight"] = head.clone()
    write_checkpoint(tmp_path, hf, CT_CONFIG, edit)
    model = load(tmp_path, "fp8", expect_untie=True)
    assert model.lm_head is not model.embed and torch.equal(model.lm_head, head)
    assert torch.equal(model.embed, hf.model.embed_tokens.weight.detach())
    assert_fp8_close(run_logits(model, PROMPT), hf_reference(hf, head), hf_reference(hf, head, fp8=False))


@pytest.mark.parametrize("scale_layout", ["channel", "tensor", "block"])
@pytest.mark.parametrize("head_first", [False, True])
def test_fp8_tied_checkpoint_with_an_fp8_lm_head_dequantizes_it(tmp_path, scale_layout, head_first):
    """compressed-tensors / HF fp8 with lm_head quantized (not in ignore / modules_to_not_convert) in a
    tied model: lm_head.weight e4m3 + its scale. The stored head is what the checkpoint means: held
    dense in the model dtype, q * scale exactly; the embedding stays as stored."""
    hf = tied_model(9)
    embed = hf.model.embed_tokens.weight.detach().float()
    head, want = fp8_head(embed, scale_layout)  # what llm-compressor writes: the quantized embedding

    def edit(t):
        drop_head(t)
        fp8_tensors(t, channel_scales)
        rest = dict(t)
        t.clear()
        t.update({**head, **rest} if head_first else {**rest, **head})
    qc = CT_CONFIG if scale_layout != "block" else {**HF_FP8, "weight_block_size": [128, 128]}
    write_checkpoint(tmp_path, hf, {**qc, "ignore": []} if qc is CT_CONFIG else qc, edit)
    for quantization in (None, "fp8"):
        model = load(tmp_path, quantization, expect_untie=True)
        assert model.quantization == "fp8" and model.lm_head.dtype == torch.float32
        assert torch.equal(model.lm_head, want), quantization
        assert torch.equal(model.embed, embed)
    assert_fp8_close(run_logits(model, PROMPT), hf_reference(hf, want), hf_reference(hf, want, fp8=False))
    if scale_layout == "channel" and not head_first:
        with pytest.warns(UserWarning, match=UNTIED_WARNING):
            ours = fastinfer_greedy(tmp_path, 6, quantization="fp8")
        assert ours == hf_greedy(hf_reference(hf, want), PROMPT, 6)


def test_fp8_tied_lm_head_without_its_scale_is_a_clear_error(tmp_path):
    hf = tied_model(10)

    def edit(t):
        fp8_tensors(t, channel_scales)
        t["lm_head.weight"] = t["lm_head.weight"].to(FP8)
    write_checkpoint(tmp_path, hf, {**CT_CONFIG, "ignore": []}, edit)
    with pytest.raises(ValueError, match="lm_head.*scale") as err:
        fastinfer.load_model(tmp_path, dtype=torch.float32, device="cpu", quantization="fp8")
    assert "quantization='fp8'" not in str(err.value)


def test_fp8_tied_lm_head_scale_without_its_weight_is_a_clear_error(tmp_path):
    hf = tied_model(11)

    def edit(t):
        drop_head(t)
        fp8_tensors(t, channel_scales)
        t["lm_head.weight_scale"] = torch.ones(hf.config.vocab_size, 1)
    write_checkpoint(tmp_path, hf, {**CT_CONFIG, "ignore": []}, edit)
    with pytest.raises(ValueError, match=r"lm_head.*(weight_scale|scale)"):
        fastinfer.load_model(tmp_path, dtype=torch.float32, device="cpu")


def test_fp8_tied_lm_head_with_a_bad_scale_shape_is_a_clear_error(tmp_path):
    hf = tied_model(12)

    def edit(t):
        fp8_tensors(t, channel_scales)
        head, _ = fp8_head(t.pop("lm_head.weight").float(), "channel")
        head["lm_head.weight_scale"] = torch.ones(7)
        t.update(head)
    write_checkpoint(tmp_path, hf, {**CT_CONFIG, "ignore": []}, edit)
    with pytest.raises(ValueError, match=r"lm_head.*scale shape \(7,\)"):
        fastinfer.load_model(tmp_path, dtype=torch.float32, device="cpu")


# ---- 4-bit checkpoints of a tied model --------------------------------------------------------------

@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_4bit_tied_checkpoint_without_lm_head(tmp_path, method):
    qc, parts = (gptq_config(), gptq_tensors) if method == "gptq" else (awq_config(), awq_tensors)
    hf = write_4bit_checkpoint(tmp_path, qc, parts, 128, seed=13, variant="llama-tied")
    assert "lm_head.weight" not in safetensors_torch.load_file(str(tmp_path / "model.safetensors"))
    model = load(tmp_path)
    assert model.quant.method == method
    assert_tied(model, hf.model.embed_tokens.weight.detach())
    torch.testing.assert_close(run_logits(model, PROMPT), hf_logits(hf), rtol=1e-4, atol=1e-4)


def _quantized_head(method, gen, out):
    def edit(tensors):
        w = tensors["model.embed_tokens.weight"]
        codes, scales, z = random_4bit(*w.shape, 128, gen)
        stored = gptq_tensors(codes, scales, z, 128) if method == "gptq" else awq_tensors(codes, scales, z, 128)
        tensors.update({f"lm_head.{p}": t.contiguous() for p, t in stored.items()})
        out[:] = [dequantize_4bit(codes, scales, z, 128)]
    return edit


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_4bit_tied_checkpoint_with_a_quantized_lm_head_uses_it(tmp_path, method):
    """GPTQModel lm_head=True on a tied model: lm_head.qweight / qzeros / scales. Until now the
    quantized head was dropped without a word and the logits came from the embedding."""
    head = []
    qc = gptq_config(lm_head=True) if method == "gptq" else awq_config()
    hf = write_4bit_checkpoint(tmp_path, qc, gptq_tensors if method == "gptq" else awq_tensors, 128, seed=14,
                               variant="llama-tied", extra=_quantized_head(method, torch.Generator().manual_seed(14), head))
    model = load(tmp_path, expect_untie=True)
    assert model.lm_head is not model.embed and torch.equal(model.lm_head, head[0])
    assert torch.equal(model.embed, hf.model.embed_tokens.weight.detach())
    ref_hf = hf_reference(hf, head[0], fp8=False)
    torch.testing.assert_close(run_logits(model, PROMPT), hf_logits(ref_hf), rtol=1e-4, atol=1e-4)


def test_4bit_tied_checkpoint_storing_only_a_quantized_lm_head(tmp_path):
    head = []
    quantized = _quantized_head("gptq", torch.Generator().manual_seed(15), head)

    def edit(tensors):
        quantized(tensors)
        tensors.pop("model.embed_tokens.weight")
    hf = write_4bit_checkpoint(tmp_path, gptq_config(lm_head=True), gptq_tensors, 128, seed=15,
                               variant="llama-tied", extra=edit)
    model = load(tmp_path)
    assert_tied(model, head[0])
    ref_hf = hf_reference(hf, embed=head[0], fp8=False)
    torch.testing.assert_close(run_logits(model, PROMPT), hf_logits(ref_hf), rtol=1e-4, atol=1e-4)


def test_dense_tied_checkpoint_with_a_distinct_head_warns(tmp_path):
    """The float path keeps transformers 5's rule (tests/test_loader_parity.py) and now says so."""
    hf = tied_model(16)
    head = 0.5 * torch.randn(hf.lm_head.weight.shape, generator=torch.Generator().manual_seed(16))
    write_checkpoint(tmp_path, hf, edit=lambda t: t.__setitem__("lm_head.weight", head.clone()))
    model = load(tmp_path, expect_untie=True)
    assert torch.equal(model.lm_head, head)
    torch.testing.assert_close(run_logits(model, PROMPT), hf_logits(hf_reference(hf, head, fp8=False)),
                               rtol=1e-4, atol=1e-4)
