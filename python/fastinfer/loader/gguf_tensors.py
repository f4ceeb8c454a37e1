"""GGUF tensor names -> HF parameter names and shapes, per architecture (llama.cpp's converters' naming).

    blk.N.attn_q / attn_k / attn_v / attn_output   self_attn.q_proj / k_proj / v_proj / o_proj
    blk.N.attn_qkv                                 self_attn.qkv_proj (Phi-3: q, k, v rows stacked, as HF has them)
    blk.N.ffn_gate / ffn_up / ffn_down             mlp.gate_proj / up_proj / down_proj
    blk.N.ffn_up (phi3)                            mlp.gate_up_proj (gate rows, then up rows)
    blk.N.ffn_gate_inp                             the router: block_sparse_moe.gate (Mixtral) / mlp.gate (Qwen MoE) /
                                                   block_sparse_moe.router.layer (Granite-MoE)
    blk.N.ffn_{gate,up,down}_exps [E, rows, K]     expert j's w1 / w3 / w2 (Mixtral) or gate_proj / up_proj / down_proj
                                                   (Qwen MoE: mlp.experts.j, Granite-MoE: block_sparse_moe.experts.j)
    blk.N.ffn_{gate,up,down}.J                     expert J's w1 / w3 / w2 in early Mixtral files
    blk.N.ffn_{gate,up,down}_shexp                 Qwen2-MoE's mlp.shared_expert.*
    blk.N.ffn_gate_inp_shexp [hidden]              Qwen2-MoE's mlp.shared_expert_gate [1, hidden]

A stacked expert tensor becomes one GGUFTensor view per expert (its rows of blocks, nothing copied), so the
dequantizing and the 4-bit readers treat experts like any other projection.
"""
from __future__ import annotations

from .gguf_file import GGUFFile, GGUFTensor

# tensors that describe rope (folded into the config), not parameters
ROPE_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")
# HF names that are linear projections (4-bit under quantization="gguf"); routers and norms are not
PROJECTION_SUFFIXES = tuple(f".{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj",
                                                      "up_proj", "down_proj", "gate_up_proj", "w1", "w2", "w3"))
MOE_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "granitemoe")

_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                 "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_LAYER_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
                "attn_qkv": "self_attn.qkv_proj",
                "ffn_gate_shexp": "mlp.shared_expert.gate_proj", "ffn_up_shexp": "mlp.shared_expert.up_proj",
                "ffn_down_shexp": "mlp.shared_expert.down_proj", "ffn_gate_inp_shexp": "mlp.shared_expert_gate"}
_EXPERT_PARTS = {"ffn_gate_exps": 0, "ffn_up_exps": 1, "ffn_down_exps": 2}
# Gemma's four norms a layer: ffn_norm is the pre-feedforward one there (the post-attention norm has its own name)
_GEMMA_NORMS = {"post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
                "post_ffw_norm": "post_feedforward_layernorm"}
_POST_NORMS = {"post_attention_norm": "post_attention_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}  # OLMo-2


def _moe_prefix(config: dict) -> str:
    return "block_sparse_moe" if config["model_type"] in ("mixtral", "granitemoe") else "mlp"


def _expert_names(config: dict, i: int, j: int) -> tuple[str, str, str]:
    """Layer i, expert j: the (gate, up, down) HF names."""
    if config["model_type"] == "mixtral":
        e = f"model.layers.{i}.block_sparse_moe.experts.{j}."
        return e + "w1.weight", e + "w3.weight", e + "w2.weight"
    e = f"model.layers.{i}.{_moe_prefix(config)}.experts.{j}."  # Qwen's mlp., Granite-MoE's block_sparse_moe.
    return e + "gate_proj.weight", e + "up_proj.weight", e + "down_proj.weight"


def moe_layer_indices(file: GGUFFile, layers: int) -> list[int]:
    """The layers whose MLP is a mixture of experts (a router tensor, ffn_gate_inp)."""
    return [i for i in range(layers) if f"blk.{i}.ffn_gate_inp.weight" in file.tensors]


def hf_tensor_map(file: GGUFFile, config: dict) -> dict[str, GGUFTensor]:
    """HF parameter name -> the GGUF tensor holding it (raw, q/k rows still permuted; a stacked expert tensor as
    one view per expert), checked for missing, unexpected and mis-shaped tensors."""
    expected = expected_shapes(config)
    found, unexpected = {}, []
    for gguf_name, tensor in file.tensors.items():
        if gguf_name in ROPE_TENSORS:
            continue  # folded into config["rope_scaling"]
        parts = gguf_name.split(".")
        stack = len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _EXPERT_PARTS
        if stack and config["model_type"] in MOE_MODEL_TYPES and parts[3] == "weight":
            views = _expert_views(file, config, int(parts[1]), _EXPERT_PARTS[parts[2]], tensor, expected)
            if views is None:
                unexpected.append(gguf_name)
            found.update(views or {})
            continue
        name = _hf_name(gguf_name, config)
        if name not in expected:
            unexpected.append(gguf_name)
            continue
        if expected[name][0] == 1 and list(tensor.shape) == expected[name][1:]:  # [hidden] stored for [1, hidden]
            tensor = GGUFTensor(tensor.name, tensor.qtype, (1, *tensor.shape), tensor.data.reshape(1, -1))
        if list(tensor.shape) != expected[name]:
            raise ValueError(f"{file.path}: tensor {gguf_name!r} has shape {list(tensor.shape)}, "
                             f"expected {expected[name]} for {name}")
        found[name] = tensor
    missing = [name for name in expected if name not in found]
    if missing:
        raise ValueError(f"{file.path}: {len(missing)} tensor(s) missing, e.g. {missing[:3]}")
    if unexpected:
        raise ValueError(f"{file.path}: unexpected tensor(s) for a {config['model_type']} model: {unexpected[:5]}")
    return found


def _expert_views(file: GGUFFile, config: dict, i: int, part: int, tensor: GGUFTensor,
                  expected: dict) -> dict[str, GGUFTensor] | None:
    experts = config.get("num_local_experts", config.get("num_experts"))
    names = [_expert_names(config, i, j)[part] for j in range(experts)]
    if names[0] not in expected:
        return None  # a layer that is not a MoE layer
    shape = [experts, *expected[names[0]]]
    if list(tensor.shape) != shape:
        raise ValueError(f"{file.path}: tensor {tensor.name!r} has shape {list(tensor.shape)}, expected {shape} "
                         f"([experts, rows, columns])")
    return {name: GGUFTensor(f"{tensor.name}[{j}]", tensor.qtype, tuple(shape[1:]), tensor.data[j])
            for j, name in enumerate(names)}


def _hf_name(gguf_name: str, config: dict) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if (len(parts) == 5 and parts[0] == "blk" and parts[1].isdigit() and parts[3].isdigit()
            and f"{parts[2]}_exps" in _EXPERT_PARTS and config["model_type"] == "mixtral"):
        # early llama.cpp Mixtral files: one tensor per expert, blk.N.ffn_gate.J.weight
        return _expert_names(config, int(parts[1]), int(parts[3]))[_EXPERT_PARTS[f"{parts[2]}_exps"]]
    if not (len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit()):
        return None
    if parts[2] == "ffn_gate_inp":  # the router: Granite-MoE's router.layer, the others' gate
        router = "router.layer" if config["model_type"] == "granitemoe" else "gate"
        return f"model.layers.{parts[1]}.{_moe_prefix(config)}.{router}.{parts[3]}"
    if parts[2] == "ffn_up" and config["model_type"] == "phi3":
        return f"model.layers.{parts[1]}.mlp.gate_up_proj.{parts[3]}"
    if config["model_type"] in ("gemma2", "gemma3_text") and parts[2] in _GEMMA_NORMS:
        return f"model.layers.{parts[1]}.{_GEMMA_NORMS[parts[2]]}.{parts[3]}"
    if config["model_type"] == "olmo2" and parts[2] in _POST_NORMS:
        return f"model.layers.{parts[1]}.{_POST_NORMS[parts[2]]}.{parts[3]}"
    if parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    return None


def expected_shapes(config: dict) -> dict[str, list[int]]:
    """HF name -> HF shape ([out_features, in_features] for linear layers)."""
    hidden, ffn, head_dim = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    q_rows, kv_rows = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    model_type = config["model_type"]
    shapes = {"model.embed_tokens.weight": [config["vocab_size"], hidden], "model.norm.weight": [hidden]}
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = [config["vocab_size"], hidden]
    attention = {"input_layernorm.weight": [hidden], "post_attention_layernorm.weight": [hidden]}
    if model_type == "olmo2":  # post-norms only, q / k norms over the whole projections
        attention = {"post_attention_layernorm.weight": [hidden], "post_feedforward_layernorm.weight": [hidden],
                     "self_attn.q_norm.weight": [q_rows], "self_attn.k_norm.weight": [kv_rows]}
    if model_type in ("gemma2", "gemma3_text"):
        attention.update({"pre_feedforward_layernorm.weight": [hidden], "post_feedforward_layernorm.weight": [hidden]})
    if model_type == "phi3":
        attention["self_attn.qkv_proj.weight"] = [q_rows + 2 * kv_rows, hidden]
    else:
        attention.update({"self_attn.q_proj.weight": [q_rows, hidden], "self_attn.k_proj.weight": [kv_rows, hidden],
                          "self_attn.v_proj.weight": [kv_rows, hidden]})
    attention["self_attn.o_proj.weight"] = [hidden, q_rows]
    if config["attention_bias"] or config.get("qkv_bias"):  # Qwen2 (-MoE) biases q / k / v, Llama and Qwen3 o too
        attention.update({"self_attn.q_proj.bias": [q_rows], "self_attn.k_proj.bias": [kv_rows],
                          "self_attn.v_proj.bias": [kv_rows]})
        if model_type not in ("qwen2", "qwen2_moe"):
            attention["self_attn.o_proj.bias"] = [hidden]
    if model_type in ("qwen3", "qwen3_moe", "gemma3_text"):
        attention.update({"self_attn.q_norm.weight": [head_dim], "self_attn.k_norm.weight": [head_dim]})
    if model_type == "phi3":
        dense = {"mlp.gate_up_proj.weight": [2 * ffn, hidden], "mlp.down_proj.weight": [hidden, ffn]}
    else:
        dense = {"mlp.gate_proj.weight": [ffn, hidden], "mlp.up_proj.weight": [ffn, hidden],
                 "mlp.down_proj.weight": [hidden, ffn]}
    dense_layers = set(config.get("mlp_only_layers") or ()) if model_type in MOE_MODEL_TYPES else None
    for i in range(config["num_hidden_layers"]):
        shapes.update({f"model.layers.{i}.{key}": shape for key, shape in attention.items()})
        if dense_layers is None or i in dense_layers:
            shapes.update({f"model.layers.{i}.{key}": shape for key, shape in dense.items()})
        else:
            shapes.update(_moe_shapes(config, i))
    return shapes


def _moe_shapes(config: dict, i: int) -> dict[str, list[int]]:
    hidden = config["hidden_size"]
    experts = config.get("num_local_experts", config.get("num_experts"))
    mixtral_like = config["model_type"] in ("mixtral", "granitemoe")
    f = config["intermediate_size"] if mixtral_like else config["moe_intermediate_size"]
    router = "router.layer" if config["model_type"] == "granitemoe" else "gate"
    shapes = {f"model.layers.{i}.{_moe_prefix(config)}.{router}.weight": [experts, hidden]}
    for j in range(experts):
        gate, up, down = _expert_names(config, i, j)
        shapes.update({gate: [f, hidden], up: [f, hidden], down: [hidden, f]})
    if config["model_type"] == "qwen2_moe":
        s, p = config["shared_expert_intermediate_size"], f"model.layers.{i}.mlp.shared_expert"
        shapes.update({f"{p}.gate_proj.weight": [s, hidden], f"{p}.up_proj.weight": [s, hidden],
                       f"{p}.down_proj.weight": [hidden, s], f"{p}_gate.weight": [1, hidden]})
    return shapes
