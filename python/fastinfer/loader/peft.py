"""A PEFT LoRA model (`peft.PeftModel.from_pretrained(base, adapter)`) as the plain HF state dict of what it
computes now: every LoRA-wrapped linear layer's weight plus its active adapters' deltas (merged, as PEFT's
`merge_and_unload` would, without touching the user's model), `modules_to_save` copies in place of the modules
they replace.

    W' = W + sum over active adapters a of  get_delta_weight(a)     (PEFT's own: B_a @ A_a * scaling_a)

PEFT's unmerged forward computes x W^T + (x A^T B^T) s, so the merged weights give its outputs to rounding.
An adapter that is disabled (`with model.disable_adapter():`, merged ones then taken out again, as PEFT's forward
unmerges them), already merged into the base weights (`merge_adapter()`), or not active contributes nothing. What is refused, by name: adapters other than LoRA,
LoRA variants (DoRA, ...), LoRA biases, LoRA on modules other than linear layers and embeddings, trainable
tokens, PeftMixedModel, and adapters loaded into a transformers model with load_adapter().

PEFT is never imported: these are PEFT's public module attributes (lora_A / lora_B, base_layer, merged,
disable_adapters, active_adapters, get_delta_weight; ModulesToSaveWrapper's original_module / modules_to_save).
"""
from __future__ import annotations

import torch

_LORA_PARTS = (".lora_A.", ".lora_B.", ".lora_embedding_A.", ".lora_embedding_B.", ".lora_magnitude_vector.")


def is_peft_model(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def refuse_unmergeable(model) -> None:
    """Adapter setups this module does not merge, named (before they fail as unexpected weight names)."""
    if type(model).__name__ == "PeftMixedModel":
        raise ValueError("a PeftMixedModel (mixed adapter types) is not supported; use a PeftModel of LoRA adapters")
    if getattr(model, "_hf_peft_config_loaded", False):
        raise ValueError("adapters loaded into a transformers model with load_adapter() are not supported: load them "
                         "with peft.PeftModel.from_pretrained(model, adapter) instead")


def check_peft_model(model) -> None:
    """Refuse adapter kinds the merge does not cover, before anything is computed."""
    for _, module in model.get_base_model().named_modules():
        if hasattr(module, "token_adapter"):
            raise ValueError("PEFT trainable tokens (LoraConfig trainable_token_indices) are not supported")
    for name, config in model.peft_config.items():
        kind = str(getattr(getattr(config, "peft_type", None), "value", getattr(config, "peft_type", None)))
        if kind != "LORA":
            raise ValueError(f"PEFT adapter {name!r} is {kind}; fastinfer runs LoRA adapters only (merged into "
                             f"the weights)")


def adapter_state(model) -> tuple:
    """What decides the merged weights besides the parameters: changes when adapters are switched, disabled or
    merged, so a cached copy is rebuilt."""
    state = []
    for _, module in model.get_base_model().named_modules():
        if hasattr(module, "lora_A") or hasattr(module, "modules_to_save"):
            # set_scale / rescale_adapter_scale change scaling without touching a parameter
            state.append((tuple(module.active_adapters), bool(module.disable_adapters),
                          tuple(getattr(module, "merged_adapters", ())),
                          tuple(sorted(getattr(module, "scaling", {}).items()))))
    return tuple(state)


def merged_state_dict(model) -> dict[str, torch.Tensor]:
    """The base model's state dict with LoRA deltas merged and wrapper names removed (module docstring)."""
    check_peft_model(model)
    base = model.get_base_model()
    replaced: dict[str, torch.Tensor] = {}  # clean parameter name -> tensor
    for path, module in base.named_modules():
        prefix = f"{path}." if path else ""
        if hasattr(module, "lora_A") and hasattr(module, "base_layer"):
            for leaf, tensor in _merged_lora(path, module).items():
                replaced[prefix + leaf] = tensor
        elif hasattr(module, "modules_to_save") and hasattr(module, "original_module"):
            active = module.active_adapters
            use = module.original_module if module.disable_adapters or not active or \
                active[0] not in module.modules_to_save else module.modules_to_save[active[0]]
            for leaf, tensor in use.state_dict().items():
                replaced[prefix + leaf] = tensor
    out = {}
    for name, tensor in base.state_dict().items():
        if any(part in name for part in _LORA_PARTS) or ".modules_to_save." in name or ".original_module." in name:
            continue
        clean = name.replace(".base_layer.", ".")
        out[clean] = replaced.get(clean, tensor)
    missing = set(replaced) - set(out)
    out.update({name: replaced[name] for name in missing})  # a modules_to_save module's own names
    return out


def _merged_lora(path: str, module) -> dict[str, torch.Tensor]:
    base_layer = module.base_layer
    if not isinstance(base_layer, (torch.nn.Linear, torch.nn.Embedding)):
        raise ValueError(f"{path}: LoRA on a {type(base_layer).__name__} is not supported (linear layers and "
                         f"embeddings are)")
    weight = base_layer.weight
    state = {"weight": weight}
    if getattr(base_layer, "bias", None) is not None:
        state["bias"] = base_layer.bias
    merged = list(getattr(module, "merged_adapters", ()))
    if module.merged and not module.disable_adapters:  # base_layer holds the deltas; PEFT then runs it alone
        return state
    # disabled: PEFT unmerges what was merged and runs the base layer; otherwise the active adapters' deltas
    adapters, sign = (merged, -1.0) if module.disable_adapters else (module.active_adapters, 1.0)
    delta = None
    for adapter in adapters:
        if adapter not in module.lora_A and adapter not in getattr(module, "lora_embedding_A", {}):
            continue  # this layer is not adapted by that adapter
        variant = getattr(module, "lora_variant", {}).get(adapter) or getattr(module, "use_dora", {}).get(adapter)
        if variant:
            raise ValueError(f"{path}: adapter {adapter!r} is a LoRA variant ({type(variant).__name__ if variant is not True else 'DoRA'}); "
                             f"only plain LoRA is supported")
        if getattr(module, "lora_bias", {}).get(adapter):
            raise ValueError(f"{path}: adapter {adapter!r} has LoRA biases (lora_bias=True), which are not supported")
        d = module.get_delta_weight(adapter).to(torch.float32)
        delta = d if delta is None else delta + d
    if delta is not None:
        if tuple(delta.shape) != tuple(weight.shape):
            raise ValueError(f"{path}: the LoRA delta has shape {tuple(delta.shape)}, the weight {tuple(weight.shape)}")
        state["weight"] = (weight.to(torch.float32) + sign * delta).to(weight.dtype)
    return state
