"""Speculative decoding: verification of proposed tokens against the target model.

`verify` draws the op's randomness from per-request generators and calls
`ops.speculative_verify`, which implements the rule (Leviathan et al. 2023; Chen et al. 2023):
accept proposal x_i with probability min(1, p(x_i) / q(x_i)); at the first rejection sample from
norm(max(0, p - q)); if all are accepted, sample the bonus token from p. The emitted tokens are
then distributed exactly as tokens sampled from the target one at a time.
"""
from __future__ import annotations

import torch

from . import _ops as ops


def draw_uniforms(batch_size: int, k: int, generators: list[torch.Generator | None] | None,
                  device: torch.device | str, counts: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """U[0, 1) fp32 (uniform_accept [B, k], uniform_sample [B]) for speculative_verify.

    Request b draws its numbers from generators[b] (which must live on `device`): counts[b] + 1 of
    them (its own proposal count, default k: the accept uniforms it uses, then the sample one), so
    its tokens do not depend on the rest of the batch (not even on how long the other requests'
    proposals are); requests without a generator share one draw from torch's default generator.
    """
    if generators is not None and len(generators) != batch_size:
        raise ValueError(f"generators must have one entry per request ({batch_size}), got {len(generators)}")
    generators = generators or [None] * batch_size
    uniforms = torch.empty(batch_size, k + 1, dtype=torch.float32, device=device)
    default_rows = [b for b, g in enumerate(generators) if g is None]
    if len(default_rows) == batch_size:
        uniforms.uniform_()
    elif default_rows:
        rows = torch.tensor(default_rows, device=device)
        uniforms[rows] = torch.rand(len(default_rows), k + 1, device=device)
    for b, generator in enumerate(generators):
        if generator is not None:
            n = k if counts is None else counts[b]
            r = torch.rand(n + 1, generator=generator, device=device)
            uniforms[b, :n] = r[:n]
            uniforms[b, n:k] = 0.0  # past its proposals: never read
            uniforms[b, k] = r[n]
    fresh = torch.contiguous_format  # new, densely strided tensors, even for a batch of one
    return uniforms[:, :k].clone(memory_format=fresh), uniforms[:, k].clone(memory_format=fresh)


def verify(
    draft_token_ids: torch.Tensor,  # [B, k] int64, -1 past each request's count
    num_draft_tokens: torch.Tensor,  # [B] int32, each in [0, k]
    target_probs: torch.Tensor,  # [B, k + 1, V] fp32: target probabilities, proposals then bonus
    draft_probs: torch.Tensor | None = None,  # [B, k, V] fp32, or None: point mass on the proposal
    generators: list[torch.Generator | None] | None = None,
    greedy: bool = False,
    num_draft_host: list[int] | None = None,  # num_draft_tokens on the host: seeded rows draw only what they use
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [B, k + 1] int64 padded with -1, num_accepted [B] int32); num_accepted + 1 emitted.

    Greedy verification needs no randomness: it accepts the longest prefix that matches the
    target argmax, then emits the target argmax.
    """
    for name, t, ndim in [("draft_token_ids", draft_token_ids, 2), ("target_probs", target_probs, 3)]:
        if not isinstance(t, torch.Tensor) or t.dim() != ndim:
            raise ValueError(f"{name} must be a {ndim}-D torch.Tensor, got {getattr(t, 'shape', type(t).__name__)}")
    if greedy:
        return ops.speculative_verify(draft_token_ids, num_draft_tokens, target_probs, greedy=True)
    batch_size, k = draft_token_ids.shape
    uniform_accept, uniform_sample = draw_uniforms(batch_size, k, generators, target_probs.device, num_draft_host)
    return ops.speculative_verify(draft_token_ids, num_draft_tokens, target_probs, draft_probs,
                                  uniform_accept, uniform_sample)
