"""Validating wrapper of the speculative-decoding verify op (re-exported by _ops.py): errors name the
offending argument, as in _ops.py."""
from __future__ import annotations

import torch

from ._checks import _check, _check_shape, _fail, _ops

# Largest vocabulary of speculative_verify: the CUDA kernel's chunk table (kMaxVocab in
# csrc/include/fastinfer/spec/verify_math.h).
SPEC_MAX_VOCAB = 1 << 20


def _check_spec_indices(op: str, draft_token_ids, num_draft_tokens, vocab: int) -> None:
    """Host-side: each count in [0, k], each id in use (position < its count) in [0, vocab)."""
    k = draft_token_ids.shape[1]
    counts = num_draft_tokens.cpu()
    if counts.numel() and (int(counts.min()) < 0 or int(counts.max()) > k):
        _fail(op, f"num_draft_tokens must lie in [0, k={k}], got [{int(counts.min())}, {int(counts.max())}]")
    in_use = draft_token_ids.cpu()[torch.arange(k) < counts[:, None].to(torch.int64)]
    if in_use.numel() and (int(in_use.min()) < 0 or int(in_use.max()) >= vocab):
        _fail(op, f"draft_token_ids in use must lie in [0, {vocab}) (the vocabulary), "
                  f"got [{int(in_use.min())}, {int(in_use.max())}]")


def _check_spec_uniforms(op: str, uniform_accept, uniform_sample, greedy: bool, batch: int, k: int, like) -> None:
    """Both required unless greedy (then ignored, but checked when given)."""
    for name, t, shape in [("uniform_accept", uniform_accept, (batch, k)),
                           ("uniform_sample", uniform_sample, (batch,))]:
        if t is None:
            if not greedy:
                _fail(op, f"{name} is required unless greedy, got None")
            continue
        _check(op, name, t, ndim=len(shape), dtype=torch.float32, device=like.device, contiguous=True)
        _check_shape(op, name, t, shape)


def speculative_verify(draft_token_ids: torch.Tensor, num_draft_tokens: torch.Tensor, target_probs: torch.Tensor,
                       draft_probs: torch.Tensor | None = None, uniform_accept: torch.Tensor | None = None,
                       uniform_sample: torch.Tensor | None = None, greedy: bool = False,
                       output_token_ids: torch.Tensor | None = None, num_accepted: torch.Tensor | None = None,
                       check_indices: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Verify k_b <= k proposed tokens per request; returns (output_token_ids, num_accepted).

    draft_token_ids int64 [B, k]: request b proposes draft_token_ids[b, :num_draft_tokens[b]];
        later entries are ignored (pad with -1).
    num_draft_tokens int32 [B], each in [0, k].
    target_probs fp32 [B, k + 1, V]: the target's processed probabilities at every proposed
        position, then the bonus position (row k_b is request b's bonus row).
    draft_probs fp32 [B, k, V], or None: the draft is a point mass on each proposal (n-gram).
    uniform_accept fp32 [B, k] and uniform_sample fp32 [B], U[0, 1): the randomness of the accept
        tests and of the residual / bonus draw (inverse CDF); required unless greedy.
    greedy: accept while the proposal is argmax(target_probs) (first index on ties), then emit the
        target argmax; draft_probs and the uniforms are ignored.
    Rule: accept x_i with probability min(1, p(x_i) / q(x_i)); at the first rejection draw from
    norm(max(0, p - q)) (from p if that has no mass); if all k_b are accepted, draw the bonus
    token from p at position k_b. Probabilities are sanitized first (NaN, negative -> 0, > 1 -> 1).
    Returns output_token_ids int64 [B, k + 1] (the num_accepted[b] accepted proposals, the one
    residual / bonus token, then -1) and num_accepted int32 [B]; num_accepted + 1 tokens are
    emitted. check_indices=False skips the host sync of the count / id range checks (CUDA graphs).
    """
    op = "speculative_verify"
    _check(op, "target_probs", target_probs, ndim=3, dtype=torch.float32)
    device = target_probs.device
    _check(op, "draft_token_ids", draft_token_ids, ndim=2, dtype=torch.int64, device=device, contiguous=True)
    batch, k = draft_token_ids.shape
    vocab = target_probs.shape[2]
    if not 1 <= vocab <= SPEC_MAX_VOCAB:
        _fail(op, f"target_probs vocabulary must lie in [1, {SPEC_MAX_VOCAB}], got {vocab}")
    _check_shape(op, "target_probs", target_probs, (batch, k + 1, vocab))
    _check(op, "num_draft_tokens", num_draft_tokens, ndim=1, dtype=torch.int32, device=device, contiguous=True)
    _check_shape(op, "num_draft_tokens", num_draft_tokens, (batch,))
    if draft_probs is not None:
        _check(op, "draft_probs", draft_probs, ndim=3, dtype=torch.float32, device=device)
        _check_shape(op, "draft_probs", draft_probs, (batch, k, vocab))
    if not isinstance(greedy, bool):
        _fail(op, f"greedy must be a bool, got {type(greedy).__name__}")
    _check_spec_uniforms(op, uniform_accept, uniform_sample, greedy, batch, k, target_probs)
    if output_token_ids is None:
        output_token_ids = torch.empty(batch, k + 1, dtype=torch.int64, device=device)
    if num_accepted is None:
        num_accepted = torch.empty(batch, dtype=torch.int32, device=device)
    _check(op, "output_token_ids", output_token_ids, ndim=2, dtype=torch.int64, device=device, contiguous=True)
    _check_shape(op, "output_token_ids", output_token_ids, (batch, k + 1))
    _check(op, "num_accepted", num_accepted, ndim=1, dtype=torch.int32, device=device, contiguous=True)
    _check_shape(op, "num_accepted", num_accepted, (batch,))
    if check_indices:
        _check_spec_indices(op, draft_token_ids, num_draft_tokens, vocab)
    _ops.speculative_verify(output_token_ids, num_accepted, draft_token_ids, num_draft_tokens, target_probs,
                            draft_probs, uniform_accept, uniform_sample, greedy)
    return output_token_ids, num_accepted
