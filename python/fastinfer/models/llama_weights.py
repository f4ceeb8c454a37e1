"""Loading a LlamaForCausalLM's weights: HF checkpoint names -> the fused parameters (q/k/v and gate / up
concatenated), FP8 and 4-bit layers quantized or packed as the tensors arrive, a tied LM head resolved
once the embedding is in. LlamaForCausalLM.load_weights is the entry point."""
from __future__ import annotations

import re
import warnings
from typing import TYPE_CHECKING, Iterable

import torch

from .._checks import FP8
from ..quant import fp8
from ..quant.int4 import QuantizedWeight
from ..quant.linear import Int4Rows
from .linear import LinearRows

if TYPE_CHECKING:
    from .llama import LlamaForCausalLM


def load_weights(model: LlamaForCausalLM, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Copy HF-named tensors into the fused parameters; every parameter must be filled exactly.
    FP8 layers take float weights (quantized here) or FP8 ones with their scales (quant/fp8.py);
    4-bit layers take float weights (round-to-nearest) or a QuantizedWeight (packed as copied);
    a dense or FP8 layer takes a QuantizedWeight dequantized. The LM head is never quantized: an
    FP8 or 4-bit one is dequantized, and a tied model's (tie_word_embeddings) is the embedding
    unless the checkpoint stores a different one (load_tied_head)."""
    targets, kv_scales = weight_targets(model), kv_scale_targets(model)
    weights = split_fused_experts(model, weights)
    fp8_parts = fp8.Fp8Parts(model.config.fp8_weight_block_size)
    filled: set[str] = set()
    tied = model.config.tie_word_embeddings
    tied_head: dict[str, object] = {}  # a tied model's lm_head.* tensors, if the checkpoint stores any
    for name, tensor in weights:
        module, _, leaf = name.rpartition(".")
        dest = targets.get(name, targets.get(module + ".weight"))
        is_dense_tensor = isinstance(tensor, torch.Tensor)
        fp8_layer = isinstance(dest, LinearRows) and dest.is_fp8
        if name in kv_scales:
            if tensor.numel() != 1:
                raise ValueError(f"{name} has shape {tuple(tensor.shape)}: one k / v scale per layer is "
                                 f"supported (kv_cache_scheme strategy 'tensor'), not per head")
            kv_scales[name].copy_(tensor.reshape(1))
        elif tied and module == "lm_head":  # resolved once the embedding is in (any order, any shard)
            if leaf in ("weight",) + fp8.AUX_NAMES:
                tied_head[leaf] = tensor
            elif not (leaf == "bias" and model.quant is not None and is_dense_tensor and not bool(tensor.any())):
                raise ValueError(f"unexpected weight {name!r} for {model.config.architecture} (its lm_head "
                                 f"has no {leaf}; config.json has tie_word_embeddings=True)")
        elif (fp8_layer or isinstance(dest, torch.Tensor)) and is_dense_tensor \
                and (leaf in fp8.AUX_NAMES or tensor.dtype == FP8):
            # an FP8 projection's parts, or an FP8 lm_head (kept dense: dequantized)
            if fp8_parts.add(module, leaf, tensor, dest):
                filled.add(module + ".weight")
        elif isinstance(dest, (LinearRows, Int4Rows)) and leaf in fp8.AUX_NAMES:
            raise ValueError(f"{name!r} belongs to an FP8 checkpoint but its layer is not FP8 (config.json has "
                             f"no FP8 quantization_config: load with quantization='fp8')")
        elif name in targets and isinstance(dest, Int4Rows) and is_dense_tensor and model.quant.method != "int4":
            raise ValueError(f"{name} is stored unquantized in this {model.quant.method} checkpoint, but fastinfer "
                             f"runs that projection in 4 bits (with the rest of its layer) and does not re-quantize "
                             f"it: checkpoints that leave projections unquantized (quantization_config "
                             f"modules_to_not_convert / modules_in_block_to_quantize) load only when those are "
                             f"layers fastinfer keeps unquantized (embeddings, LM head, MoE routers)")
        elif name in targets:
            copy_weight(name, tensor, dest)
            filled.add(name)
        elif (leaf == "bias" and model.quant is not None and module + ".weight" in targets and is_dense_tensor
              and not bool(tensor.any())):
            pass  # the all-zero bias buffers AutoGPTQ saved for bias-free layers (vLLM skips them too)
        elif not name.endswith("rotary_emb.inv_freq"):
            raise ValueError(f"unexpected weight {name!r} for {model.config.architecture}")
    if tied_head:
        load_tied_head(model, tied_head, filled)
    fp8_parts.check_complete()
    for group in moe_alternatives(model):  # a MoE tensor comes fused (HF 5.x) or per expert (checkpoints)
        if any(set(names) <= filled for names in group):
            filled.update(name for names in group for name in names)
    missing = sorted(set(targets) - filled)
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} weight(s), e.g. {missing[:3]}")


# what feeds a residual add: o_proj (weight, bias), the MLP's down_proj, Granite-MoE's experts' down projections
# (fused as checkpoints and transformers 5 name them, or per expert)
_RESIDUAL_FED = re.compile(r"(self_attn\.o_proj\.(weight|bias)|mlp\.down_proj\.weight|block_sparse_moe\."
                           r"(output_linear\.weight|experts\.down_proj|experts\.\d+\.down_proj\.weight))$")


def residual_scaled(weights: Iterable[tuple[str, torch.Tensor]], multiplier: float):
    """Granite's residual_multiplier folded into o_proj (weight and bias) and down_proj (Granite-MoE: its experts'
    down projections, whose weighted sum is the MoE output): HF multiplies their
    outputs by it before each residual add; the product is taken here in fp32 and rounded once to the
    checkpoint's dtype (the outputs then differ from HF's in rounding only). Needs float weights."""
    for name, tensor in weights:
        if _RESIDUAL_FED.search(name):
            if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or tensor.dtype == FP8:
                raise ValueError(f"{name}: Granite's residual_multiplier is folded into o_proj / down_proj, which "
                                 f"needs float weights; a pre-quantized Granite checkpoint is not supported (load "
                                 f"the float one, with quantization='fp8' or 'int4' to quantize it)")
            tensor = (tensor.float() * multiplier).to(tensor.dtype)
        yield name, tensor


def load_tied_head(model: LlamaForCausalLM, parts: dict[str, object], filled: set[str]) -> None:
    """The lm_head.* tensors a tied checkpoint (tie_word_embeddings=True) stores, as transformers 5
    loads them: the head's values are the stored weight, dequantized when FP8 (weight_scale or
    weight_scale_inv; input_scale is ignored) or 4-bit (a QuantizedWeight), in the model dtype.
    Without model.embed_tokens.weight they are the shared matrix; equal to the embedding, the
    two stay one tensor; different, the head is untied and holds them (with a warning)."""
    name = "lm_head.weight"
    weight = parts.get("weight")
    scales = {k: v for k, v in parts.items() if k in fp8.SCALE_NAMES}
    if weight is None:
        if scales:
            raise ValueError(f"lm_head has a weight scale ({', '.join('lm_head.' + k for k in scales)}) but no "
                             f"{name} (config.json has tie_word_embeddings=True)")
        return  # an input_scale alone: nothing the model uses
    if tuple(weight.shape) != tuple(model.embed.shape):
        raise ValueError(f"weight {name!r} has shape {tuple(weight.shape)}, expected {tuple(model.embed.shape)} "
                         f"(the embedding's: config.json has tie_word_embeddings=True)")
    if isinstance(weight, QuantizedWeight):
        head, stored = weight.dequantize(torch.float32), "4-bit, dequantized"
    elif scales or weight.dtype == FP8:
        if not scales:
            raise ValueError(f"FP8 weight {name} came without its scale (weight_scale or weight_scale_inv)")
        head = fp8.dequantize(name, weight, scales, model.config.fp8_weight_block_size)
        stored = "FP8, dequantized"
    else:
        head, stored = weight, "dense"
    if "model.embed_tokens.weight" not in filled:  # the shared matrix stored under lm_head only
        copy_weight(name, head, model.embed)
        filled.add("model.embed_tokens.weight")
    elif not torch.equal(head.to(model.embed.device, model.embed.dtype), model.embed):
        warnings.warn(f"config.json has tie_word_embeddings=True but the checkpoint's {name} ({stored}) differs "
                      f"from model.embed_tokens.weight: the LM head is that stored {name}, untied from the "
                      f"embedding (as transformers loads it)", stacklevel=4)
        model.lm_head = torch.empty_like(model.embed)
        copy_weight(name, head, model.lm_head)

def text_weights(weights):
    """A multimodal checkpoint's tensors (config_fields.MULTIMODAL_WRAPPERS) as its text model's names:
    transformers 5's model.language_model.* and 4.x checkpoints' language_model.model.* become model.*,
    language_model.lm_head lm_head; the vision tower's and the projector's are skipped."""
    for name, tensor in weights:
        for old, new in (("model.language_model.", "model."), ("language_model.model.", "model."),
                         ("language_model.lm_head.", "lm_head.")):
            if name.startswith(old):
                yield new + name[len(old):], tensor
                break
        else:
            if not name.startswith(("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                                    "model.multi_modal_projector.")):
                yield name, tensor


def weight_targets(model: LlamaForCausalLM) -> dict[str, torch.Tensor | LinearRows | Int4Rows]:
    """HF name -> the (view of the) fastinfer tensor, or the rows of a projection, it fills."""
    t: dict[str, torch.Tensor | LinearRows | Int4Rows] = {"model.embed_tokens.weight": model.embed,
                                               "model.norm.weight": model.norm}
    if not model.config.tie_word_embeddings:
        t["lm_head.weight"] = model.lm_head
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        q, kv = layer.q_size, layer.kv_size
        t[p + "post_attention_layernorm.weight"] = layer.post_attn_norm
        if hasattr(layer, "norm_targets"):  # Gemma 2 / 3 (models/gemma.py): four norms (Gemma 3: per-head q / k norms)
            t.update(layer.norm_targets(p))
        elif hasattr(layer, "post_ff_norm"):  # OLMo-2 (models/olmo2.py): post-norms, q / k norms over the projections
            t[p + "post_feedforward_layernorm.weight"] = layer.post_ff_norm
            t[p + "self_attn.q_norm.weight"], t[p + "self_attn.k_norm.weight"] = layer.q_norm_full, layer.k_norm_full
        else:
            t[p + "input_layernorm.weight"] = layer.input_norm
        if model.config.architecture == "Phi3ForCausalLM":  # stored fused, in fastinfer's order
            t[p + "self_attn.qkv_proj.weight"] = layer.qkv.rows()
        else:
            t[p + "self_attn.q_proj.weight"] = layer.qkv.rows(0, q)
            t[p + "self_attn.k_proj.weight"] = layer.qkv.rows(q, q + kv)
            t[p + "self_attn.v_proj.weight"] = layer.qkv.rows(q + kv)
        if layer.qkv.bias is not None:
            t[p + "self_attn.q_proj.bias"] = layer.qkv.bias[:q]
            t[p + "self_attn.k_proj.bias"] = layer.qkv.bias[q:q + kv]
            t[p + "self_attn.v_proj.bias"] = layer.qkv.bias[q + kv:]
        if layer.q_norm is not None:
            t[p + "self_attn.q_norm.weight"] = layer.q_norm
            t[p + "self_attn.k_norm.weight"] = layer.k_norm
        t[p + "self_attn.o_proj.weight"] = layer.o_proj.rows()
        if layer.o_proj.bias is not None:
            t[p + "self_attn.o_proj.bias"] = layer.o_proj.bias
        if layer.moe is not None:
            t.update(moe_targets(model, i))
            continue
        if model.config.architecture == "Phi3ForCausalLM":
            t[p + "mlp.gate_up_proj.weight"] = layer.gate_up.rows()
        else:
            ffn = layer.gate_up.out_features // 2
            t[p + "mlp.gate_proj.weight"] = layer.gate_up.rows(0, ffn)
            t[p + "mlp.up_proj.weight"] = layer.gate_up.rows(ffn)
        t[p + "mlp.down_proj.weight"] = layer.down.rows()
    return t


def _moe_names(model: LlamaForCausalLM, i: int) -> tuple[str, list[tuple[str, str, str]]]:
    """Layer i's router name and per-expert (gate, up, down) names in the checkpoint's spelling: Mixtral's
    block_sparse_moe.experts.j.w1 / w3 / w2, Qwen3-MoE's mlp.experts.j.gate_proj / up_proj / down_proj (Granite-MoE
    checkpoints store the experts fused only: its per-expert names are fastinfer's, for split_fused_experts)."""
    p = f"model.layers.{i}."
    arch = model.config.architecture
    if arch == "MixtralForCausalLM":
        e = p + "block_sparse_moe."
        return e + "gate.weight", [(f"{e}experts.{j}.w1.weight", f"{e}experts.{j}.w3.weight", f"{e}experts.{j}.w2.weight")
                                   for j in range(model.config.num_experts)]
    e = p + ("block_sparse_moe." if arch == "GraniteMoeForCausalLM" else "mlp.")
    router = e + ("router.layer.weight" if arch == "GraniteMoeForCausalLM" else "gate.weight")
    return router, [(f"{e}experts.{j}.gate_proj.weight", f"{e}experts.{j}.up_proj.weight",
                     f"{e}experts.{j}.down_proj.weight") for j in range(model.config.num_experts)]


def _fused_moe_names(model: LlamaForCausalLM, i: int) -> tuple[list[str], list[str], list[str]]:
    """Layer i's names of the whole router, [E, 2 F, hidden] gate / up and [E, hidden, F] down tensors, each
    in every spelling that holds it: transformers 5's in-memory names, and the per-expert checkpoints' router
    (Granite-MoE's checkpoints: router.layer, input_linear, output_linear)."""
    router, _ = _moe_names(model, i)
    if model.config.architecture == "GraniteMoeForCausalLM":
        b = f"model.layers.{i}.block_sparse_moe."
        return ([b + "router.weight", router], [b + "experts.gate_up_proj", b + "input_linear.weight"],
                [b + "experts.down_proj", b + "output_linear.weight"])
    p = f"model.layers.{i}.mlp."
    return [p + "gate.weight", router], [p + "experts.gate_up_proj"], [p + "experts.down_proj"]


def moe_targets(model: LlamaForCausalLM, i: int) -> dict[str, torch.Tensor | LinearRows | Int4Rows]:
    """Layer i's MoE tensors: the checkpoints' per-expert names, and for dense experts the fused ones too
    (_fused_moe_names: views of the same storage). Quantized experts take the per-expert names only;
    split_fused_experts turns fused tensors into those."""
    moe, f = model.layers[i].moe, model.config.moe_intermediate_size
    p = f"model.layers.{i}.mlp."
    _, experts = _moe_names(model, i)
    routers, gate_ups, downs = _fused_moe_names(model, i)
    t = {name: moe.router for name in routers}
    if moe.experts is None:
        t.update({name: moe.gate_up for name in gate_ups} | {name: moe.down for name in downs})
        for j, (gate, up, down) in enumerate(experts):
            t[gate], t[up], t[down] = moe.gate_up[j, :f], moe.gate_up[j, f:], moe.down[j]
    else:
        for (gate, up, down), (gate_up, down_proj) in zip(experts, moe.experts):
            t[gate], t[up], t[down] = gate_up.rows(0, f), gate_up.rows(f), down_proj.rows()
    if moe.shared is not None:  # Qwen2-MoE
        gate, up, down, gate_w = moe.shared
        t[p + "shared_expert.gate_proj.weight"], t[p + "shared_expert.up_proj.weight"] = gate.rows(), up.rows()
        t[p + "shared_expert.down_proj.weight"], t[p + "shared_expert_gate.weight"] = down.rows(), gate_w
    return t


def split_fused_experts(model: LlamaForCausalLM, weights: Iterable[tuple[str, object]]):
    """HF 5.x's fused expert tensors (mlp.experts.gate_up_proj [E, 2 F, hidden], down_proj [E, hidden, F], as
    an in-memory transformers model holds them) as the per-expert tensors a quantized MoE layer takes."""
    fused = {}
    for i, layer in enumerate(model.layers):
        if layer.moe is not None and layer.moe.experts is not None:
            _, experts = _moe_names(model, i)
            _, gate_ups, downs = _fused_moe_names(model, i)
            fused.update({name: [(gate, up) for gate, up, _ in experts] for name in gate_ups})
            fused.update({name: [(down,) for _, _, down in experts] for name in downs})
    for name, tensor in weights:
        names = fused.get(name)
        if names is None:
            base, _, leaf = name.rpartition("_")
            if fused and leaf in ("scale", "inv") and (base in fused or base.removesuffix("_scale") in fused):
                raise ValueError(f"{name}: FP8 fused expert tensors (an in-memory transformers FP8 MoE model) are "
                                 f"not supported; load the checkpoint directory (per-expert tensors) instead")
            yield name, tensor
            continue
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 3 or tensor.shape[0] != len(names):
            raise ValueError(f"weight {name!r} has shape {tuple(getattr(tensor, 'shape', ()))}, expected "
                             f"[{len(names)} experts, rows, columns]")
        half = tensor.shape[1] // 2
        for j, parts in enumerate(names):
            if len(parts) == 2:
                yield parts[0], tensor[j, :half]
                yield parts[1], tensor[j, half:]
            else:
                yield parts[0], tensor[j]


def moe_alternatives(model: LlamaForCausalLM) -> list[list[list[str]]]:
    """Per MoE tensor, the alternative sets of names that fill it whole."""
    groups = []
    for i, layer in enumerate(model.layers):
        if layer.moe is None:
            continue
        _, experts = _moe_names(model, i)
        routers, gate_ups, downs = _fused_moe_names(model, i)
        groups.append([[name] for name in routers])
        groups.append([[name] for name in gate_ups] + [[n for gate, up, _ in experts for n in (gate, up)]])
        groups.append([[name] for name in downs] + [[down for _, _, down in experts]])
    return groups


def kv_scale_targets(model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    """Optional FP8 KV-cache scales a checkpoint may ship (compressed-tensors kv_cache_scheme)."""
    t = {}
    for i, layer in enumerate(model.layers):
        t[f"model.layers.{i}.self_attn.k_scale"] = layer.kv_scale[0:1]
        t[f"model.layers.{i}.self_attn.v_scale"] = layer.kv_scale[1:2]
    return t


def copy_weight(name: str, tensor: torch.Tensor | QuantizedWeight, dest: torch.Tensor | LinearRows | Int4Rows) -> None:
    """A checkpoint tensor into its destination: into an FP8 layer's rows it is quantized, into a
    4-bit layer's rows packed (a QuantizedWeight) or quantized (round-to-nearest); a QuantizedWeight
    into a dense or FP8 layer is dequantized first."""
    if tuple(tensor.shape) != tuple(dest.shape):
        raise ValueError(f"weight {name!r} has shape {tuple(tensor.shape)}, expected {tuple(dest.shape)}")
    if isinstance(tensor, torch.Tensor) and tensor.dtype == FP8:
        raise ValueError(f"weight {name!r} is {FP8} but its layer is not FP8 (load the checkpoint with its "
                         f"quantization_config or quantization='fp8')")
    with torch.no_grad():
        if isinstance(dest, Int4Rows):
            dest.copy_(tensor)
            return
        target = dest.weight if isinstance(dest, LinearRows) else dest
        if isinstance(tensor, QuantizedWeight):  # a 4-bit checkpoint into a dense or FP8 model
            tensor = tensor.dequantize(target.dtype if target.dtype != FP8 else torch.float32)
        if isinstance(dest, LinearRows) and dest.is_fp8:
            fp8.quantize_rows(dest.weight, dest.weight_scale, tensor)
        else:
            target.copy_(tensor)
