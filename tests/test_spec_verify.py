"""Speculative verify: bit-exact parity with an independent torch reference of the rule, chi-square
tests that the emitted tokens follow the target (first token, and the first two jointly), full
acceptance when draft == target, greedy semantics, ragged batches, the `verify` helper, bad
input and opcheck."""
import math

import pytest
import torch

import reference as ref

from fastinfer import ops
from fastinfer.spec import verify

kNumDraws = 100_000
kMinPValue = 1e-3
kFixedOne = 2 ** 32  # 32.32 fixed point: the op's documented CDF grid (spec/verify_math.h)
kTiny = torch.finfo(torch.float32).tiny


# ----------------------------------------------------------------------------- reference

def sanitize(p: torch.Tensor) -> torch.Tensor:
    """NaN, negatives and subnormals -> 0, above 1 -> 1."""
    return torch.where(p >= kTiny, p.clamp(max=1.0), torch.zeros_like(p))


def inverse_cdf(probs: torch.Tensor, uniform: float) -> int | None:
    """Smallest j with cumsum(fixed(probs))[j] > floor(U * total / 2^32), U = floor(u * 2^32)."""
    masses = torch.round(probs * kFixedOne).to(torch.int64)  # probs * 2^32 is exact in fp32
    total = int(masses.sum())
    if total == 0:
        return None
    u = 0 if not uniform > 0 else kFixedOne - 1 if uniform >= 1 else math.floor(uniform * kFixedOne)
    return int(torch.searchsorted(masses.cumsum(0), (u * total) // kFixedOne, right=True))


def reference_draw(p: torch.Tensor, q: torch.Tensor, uniform: float) -> int:
    """Residual draw norm(max(0, p - q)); from p if the residual is empty; argmax(p) if p is."""
    for probs in ((p - q).clamp(min=0), p):
        token = inverse_cdf(probs, uniform)
        if token is not None:
            return token
    return int(p.argmax())


def reference_verify(draft_token_ids, num_draft_tokens, target_probs, draft_probs, uniform_accept,
                     uniform_sample, greedy=False):
    """The rule, one request at a time, on the CPU; never calls a fastinfer op."""
    batch, k = draft_token_ids.shape
    p_all = sanitize(target_probs.cpu())
    q_all = None if draft_probs is None else sanitize(draft_probs.cpu())
    out = torch.full((batch, k + 1), -1, dtype=torch.int64)
    accepted = torch.zeros(batch, dtype=torch.int32)
    for b in range(batch):
        ids, n = draft_token_ids[b].tolist(), int(num_draft_tokens[b])
        m = 0
        if greedy:
            while m < n and ids[m] == int(p_all[b, m].argmax()):
                m += 1
            token = int(p_all[b, m].argmax())
        else:
            u_accept = uniform_accept.cpu()[b]
            while m < n:
                x = ids[m]
                q_x = torch.tensor(1.0) if q_all is None else q_all[b, m, x]
                if not bool(u_accept[m] * q_x < p_all[b, m, x]):  # fp32 product, as the op
                    break
                m += 1
            q = torch.zeros_like(p_all[b, m])
            if m < n:
                q = q_all[b, m] if q_all is not None else q.index_fill(0, torch.tensor(ids[m]), 1.0)
            token = reference_draw(p_all[b, m], q, float(uniform_sample.cpu()[b]))
        out[b, :m] = torch.tensor(ids[:m], dtype=torch.int64)
        out[b, m] = token
        accepted[b] = m
    return out, accepted


# ----------------------------------------------------------------------------- helpers

def normalized(x: torch.Tensor) -> torch.Tensor:
    return x / x.sum(-1, keepdim=True)


def random_case(batch, k, vocab, gen, sparsity=0.3, with_draft_probs=True):
    """Random probabilities with exact zeros and a peak (the argmax) per row, a draft close to the
    target, proposals of every acceptance length, ragged counts with -1 padding."""
    def probs(*shape):
        x = torch.rand(*shape, vocab, generator=gen) ** 3 + 1e-3
        keep = torch.rand(*shape, vocab, generator=gen) > sparsity
        keep.scatter_(-1, torch.randint(vocab, (*shape, 1), generator=gen), True)  # no empty row
        return normalized(x * keep)

    peak = torch.randint(vocab, (batch, k + 1, 1), generator=gen)
    target = 0.5 * probs(batch, k + 1) + 0.5 * torch.zeros(batch, k + 1, vocab).scatter_(-1, peak, 1.0)
    draft = normalized(0.8 * target[:, :k] + 0.2 * probs(batch, k))
    ids = torch.multinomial(draft.reshape(-1, vocab), 1, generator=gen).reshape(batch, k)
    if not with_draft_probs:  # point-mass proposers (and greedy): mostly the target's argmax
        ids = torch.where(torch.rand(batch, k, generator=gen) < 0.75, peak[:, :k, 0], ids)
    counts = torch.randint(0, k + 1, (batch,), generator=gen, dtype=torch.int32)
    ids[torch.arange(k) >= counts[:, None].long()] = -1
    return dict(draft_token_ids=ids, num_draft_tokens=counts, target_probs=target,
                draft_probs=draft if with_draft_probs else None,
                uniform_accept=torch.rand(batch, k, generator=gen), uniform_sample=torch.rand(batch, generator=gen))


def poison(case, gen):
    """Edge values the op must handle identically everywhere: NaN, inf, > 1, negative, subnormal,
    p == q rows (empty residual), all-zero rows, uniforms 0, 1 - 2^-24, 1, NaN, p(x) = 0."""
    target, draft = case["target_probs"], case["draft_probs"]
    batch, k1, vocab = target.shape
    flat = target.view(-1)
    picks = torch.randint(flat.numel(), (6,), generator=gen)
    flat[picks] = torch.tensor([float("nan"), float("inf"), 1.5, -0.25, 1e-40, 3e-39])
    target[0, 0] = 0.0  # all-zero row: argmax fallback after a rejection
    if draft is not None:
        draft[1, :] = target[1, :k1 - 1]  # p == q: with uniform 1.0 a rejection has an empty residual
        draft[2, 0, : vocab // 2] = float("nan")
    case["uniform_accept"][1] = 1.0
    case["uniform_accept"][3, 0] = float("nan")
    case["uniform_sample"][:4] = torch.tensor([0.0, 1.0 - 2 ** -24, 1.0, float("nan")])
    ids = case["draft_token_ids"]
    case["num_draft_tokens"][:10] = k1 - 1
    ids[:10] = torch.randint(vocab, (10, k1 - 1), generator=gen)
    ids[4, 0] = int(target[4, 0].argmin())  # a proposal the target gives probability 0 (sparse rows)
    # Edge values exactly at the proposals, where the accept test reads them.
    for row, value in [(5, 1e-40), (6, float("nan")), (7, 5.0)]:
        target[row, 0, ids[row, 0]] = value
    if draft is not None:
        draft[8, 0, ids[8, 0]] = 3e-39  # subnormal q(x): q = 0 accepts whenever p(x) > 0
    case["uniform_accept"][9, 0] = 1e-45  # subnormal uniform
    return case


def to_device(case, device):
    return {name: t.to(device) if isinstance(t, torch.Tensor) else t for name, t in case.items()}


def run_op(case, greedy=False):
    return ops.speculative_verify(**case, greedy=greedy)



# ----------------------------------------------------------------------------- (a) exact parity

@pytest.mark.parametrize("vocab", [1, 37, 64, 1500], ids=lambda v: f"V{v}")  # 1500: several 512-token chunks
@pytest.mark.parametrize("mode", ["draft_probs", "one_hot", "greedy"])
def test_matches_reference_exactly(device, vocab, mode):
    gen = torch.Generator().manual_seed(vocab)
    case = random_case(64, 4, vocab, gen, with_draft_probs=mode == "draft_probs")
    if vocab > 1:
        case = poison(case, gen)
    expected = reference_verify(**case, greedy=mode == "greedy")
    tokens, accepted = run_op(to_device(case, device), greedy=mode == "greedy")
    assert torch.equal(accepted.cpu(), expected[1])
    assert torch.equal(tokens.cpu(), expected[0])


@pytest.mark.parametrize("vocab", [40000, 40001], ids=["V40000", "V40001"])  # 79 chunks: 3 per lane of the scan
@pytest.mark.parametrize("mode", ["draft_probs", "greedy"])
def test_large_vocabulary_matches_reference(device, vocab, mode):
    gen = torch.Generator().manual_seed(vocab)
    case = random_case(12, 3, vocab, gen, with_draft_probs=mode == "draft_probs")
    expected = reference_verify(**case, greedy=mode == "greedy")
    tokens, accepted = run_op(to_device(case, device), greedy=mode == "greedy")
    assert torch.equal(tokens.cpu(), expected[0]) and torch.equal(accepted.cpu(), expected[1])


@pytest.mark.parametrize("offset", [8, 9], ids=["aligned", "misaligned"])  # 16-byte vector loads or not
def test_strided_probabilities_match_contiguous(device, offset):
    gen = torch.Generator().manual_seed(1)
    case = random_case(16, 3, 64, gen)
    wide_target, wide_draft = torch.rand(16, 6, 80, generator=gen), torch.rand(16, 5, 80, generator=gen)
    wide_target[:, 1:5, offset:offset + 64] = case["target_probs"]
    wide_draft[:, 2:5, offset:offset + 64] = case["draft_probs"]
    strided = dict(case, target_probs=wide_target[:, 1:5, offset:offset + 64],
                   draft_probs=wide_draft[:, 2:5, offset:offset + 64])
    expected = reference_verify(**case)
    for c in (case, strided):
        tokens, accepted = run_op(to_device(c, device))
        assert torch.equal(tokens.cpu(), expected[0]) and torch.equal(accepted.cpu(), expected[1])


def test_large_mass_threshold_is_exact():
    # All-ones rows: total mass V * 2^32 (> 2^32, the split 64-bit product) at every uniform.
    vocab = 5000
    u = torch.tensor([0.0, 0.3, 0.5, 0.9999, 1.0 - 2 ** -24])
    case = dict(draft_token_ids=torch.zeros(5, 0, dtype=torch.int64),
                num_draft_tokens=torch.zeros(5, dtype=torch.int32),
                target_probs=torch.ones(5, 1, vocab), uniform_accept=torch.zeros(5, 0), uniform_sample=u)
    tokens, _ = run_op(case)
    assert tokens[:, 0].tolist() == [math.floor(float(x) * vocab) for x in u]


# ----------------------------------------------------------------------------- (b) distribution

def adversarial_pair(name: str, vocab: int, gen):
    """(p, q or None, proposal) for the first position; q None = point mass on `proposal`."""
    p = normalized(torch.rand(vocab, generator=gen) ** 2 + 0.01)
    if name == "draft_on_disliked":
        return p, normalized(1.0 / p ** 2), None
    if name == "disjoint_supports":
        half = vocab // 2
        return torch.cat([normalized(p[:half]), torch.zeros(vocab - half)]), \
            torch.cat([torch.zeros(half), normalized(p[half:])]), None
    if name == "draft_equals_target":
        return p, p.clone(), None
    if name == "point_mass_on_disliked":
        return p, None, int(p.argmin())
    if name == "point_mass_outside_support":
        p[3] = 0.0
        return normalized(p), None, 3
    raise ValueError(name)


@pytest.mark.parametrize("name", ["draft_on_disliked", "disjoint_supports", "draft_equals_target",
                                  "point_mass_on_disliked", "point_mass_outside_support"])
def test_first_token_follows_target(device, name):
    vocab, k = 24, 2
    gen = torch.Generator().manual_seed(7)
    p, q, proposal = adversarial_pair(name, vocab, gen)
    later = normalized(torch.rand(k, vocab, generator=gen))  # positions 1 and 2: fixed
    target = torch.cat([p[None], later]).expand(kNumDraws, k + 1, vocab)
    ids = torch.zeros(kNumDraws, k, dtype=torch.int64)
    if q is None:
        ids[:, 0] = proposal
        draft = None
    else:
        draft = torch.cat([q[None], later[:1]]).expand(kNumDraws, k, vocab)
        ids[:, 0] = torch.multinomial(q, kNumDraws, replacement=True, generator=gen)
    ids[:, 1] = torch.multinomial(later[0], kNumDraws, replacement=True, generator=gen)
    case = dict(draft_token_ids=ids, num_draft_tokens=torch.full((kNumDraws,), k, dtype=torch.int32),
                target_probs=target, draft_probs=draft, uniform_accept=torch.rand(kNumDraws, k, generator=gen),
                uniform_sample=torch.rand(kNumDraws, generator=gen))
    tokens, _ = run_op(to_device(case, device))
    counts = torch.bincount(tokens[:, 0].cpu(), minlength=vocab).double()
    pvalue = ref.chi_square_pvalue(counts, p)
    print(f"first token, {name}: chi-square p-value {pvalue:.4f}")
    assert pvalue > kMinPValue


def conditional_tables(vocab: int, gen, point_mass: bool):
    """Target p1, p2[t1] and draft q1, q2[t1] (rows = the first token), the draft favouring tokens
    the target dislikes; point_mass: the draft deterministically proposes argmin of the target."""
    p1 = normalized(torch.rand(vocab, generator=gen) ** 2 + 0.02)
    p2 = normalized(torch.rand(vocab, vocab, generator=gen) ** 2 + 0.02)
    if point_mass:
        return p1, p2, torch.eye(vocab)[p1.argmin()], torch.eye(vocab)[p2.argmin(-1)]
    return p1, p2, normalized(1.0 / p1), normalized(1.0 / p2 ** 2)


def step(t_rows, q_rows, gen, device, point_mass, first_ids=None):
    """One verify step; target rows [B, k + 1, V], draft rows [B, k, V]. Proposals are drawn from
    the draft rows, except position 0 when `first_ids` is given (q_rows[:, 1] depends on it)."""
    batch, k, vocab = q_rows.shape
    ids = torch.multinomial(q_rows.reshape(-1, vocab), 1, generator=gen).reshape(batch, k)
    if first_ids is not None:
        ids[:, 0] = first_ids
    case = dict(draft_token_ids=ids, num_draft_tokens=torch.full((batch,), k, dtype=torch.int32),
                target_probs=t_rows, draft_probs=None if point_mass else q_rows,
                uniform_accept=torch.rand(batch, k, generator=gen), uniform_sample=torch.rand(batch, generator=gen))
    tokens, accepted = run_op(to_device(case, device))
    return tokens.cpu(), accepted.cpu()


@pytest.mark.parametrize("point_mass", [False, True], ids=["draft_probs", "point_mass"])
def test_first_two_tokens_follow_target_jointly(device, point_mass):
    # k = 2: tokens (t1, t2) must be distributed as p1(t1) p2(t2 | t1). The target and draft rows
    # at position 1 depend on the proposal x1; the bonus row (position 2) is fixed. Requests that
    # emit only one token take a second step (k = 1) from the prefix t1.
    vocab, n = 8, kNumDraws
    gen = torch.Generator().manual_seed(11)
    p1, p2, q1, q2 = conditional_tables(vocab, gen, point_mass)
    bonus = normalized(torch.rand(vocab, generator=gen))
    x1 = torch.multinomial(q1, n, replacement=True, generator=gen)
    t_rows = torch.stack([p1.expand(n, vocab), p2[x1], bonus.expand(n, vocab)], dim=1)
    tokens, accepted = step(t_rows, torch.stack([q1.expand(n, vocab), q2[x1]], dim=1), gen, device, point_mass,
                            first_ids=x1)
    first, second = tokens[:, 0], tokens[:, 1].clone()
    assert ((first == x1) | (accepted == 0)).all()
    again = accepted == 0
    t_rows = torch.stack([p2[first[again]], bonus.expand(int(again.sum()), vocab)], dim=1)
    second[again] = step(t_rows, q2[first[again]][:, None], gen, device, point_mass)[0][:, 0]
    counts = torch.bincount(first * vocab + second, minlength=vocab * vocab).double()
    pvalue = ref.chi_square_pvalue(counts, (p1[:, None] * p2).reshape(-1))
    print(f"first two tokens, {'point mass' if point_mass else 'draft probs'}: chi-square p-value {pvalue:.4f}")
    assert pvalue > kMinPValue


# ----------------------------------------------------------------------------- (c) - (e) semantics

def test_draft_equal_to_target_accepts_everything(device):
    gen = torch.Generator().manual_seed(3)
    case = random_case(2000, 4, 50, gen)
    case["draft_probs"] = case["target_probs"][:, :4].clone()
    case["num_draft_tokens"].fill_(4)
    case["draft_token_ids"] = torch.multinomial(case["draft_probs"].reshape(-1, 50), 1, generator=gen).reshape(-1, 4)
    tokens, accepted = run_op(to_device(case, device))
    assert (accepted == 4).all()
    assert torch.equal(tokens[:, :4].cpu(), case["draft_token_ids"])
    assert (tokens[:, 4] >= 0).all()


def test_known_answers_at_the_edges(device):
    # Row 0: p == q and a rejection (uniform 1.0): the residual is empty, so the token is drawn
    #        from p = (0.5, 0.25, 0.25) with uniform 0.6: token 1. As a point mass on token 0 the
    #        residual is (0, 0.25, 0.25): token 2.
    # Row 1: p = q = one-hot(2) and uniform 1.0: rejected, empty residual, drawn from p: token 2.
    # Row 2: an all-zero target row: p(x) = 0 rejects, no mass anywhere: argmax = token 0.
    # Row 3: no proposals (k_b = 0): the bonus draw from p at position 0 with uniform 0.9: token 2.
    p = torch.tensor([0.5, 0.25, 0.25])
    target = torch.stack([torch.stack([p, p]), torch.eye(3)[[2, 0]], torch.zeros(2, 3), torch.stack([p, p])])
    case = dict(draft_token_ids=torch.tensor([[0], [2], [1], [-1]]),
                num_draft_tokens=torch.tensor([1, 1, 1, 0], dtype=torch.int32), target_probs=target,
                draft_probs=torch.stack([p, torch.eye(3)[2], p, p])[:, None],
                uniform_accept=torch.tensor([[1.0], [1.0], [0.0], [0.5]]),
                uniform_sample=torch.tensor([0.6, 0.6, 0.6, 0.9]))
    for draft_probs, first in [(case["draft_probs"], 1), (None, 2)]:
        tokens, accepted = run_op(to_device(dict(case, draft_probs=draft_probs), device))
        assert tokens.tolist() == [[first, -1], [2, -1], [0, -1], [2, -1]]
        assert accepted.tolist() == [0, 0, 0, 0]


def test_greedy_accepts_the_longest_argmax_prefix(device):
    gen = torch.Generator().manual_seed(5)
    batch, k, vocab = 40, 5, 30
    target = torch.rand(batch, k + 1, vocab, generator=gen)
    best = target.argmax(-1)
    match_len = torch.randint(0, k + 1, (batch,), generator=gen)
    wrong = (best[:, :k] + torch.randint(1, vocab, (batch, k), generator=gen)) % vocab
    ids = torch.where(torch.arange(k) < match_len[:, None], best[:, :k], wrong)
    # Ties: row 0 has two maxima at position 0; the first index wins, so proposing the second fails.
    target[0, 0, 4] = target[0, 0, 9] = 2.0
    ids[0, 0], match_len[0] = 9, 0
    best[0, 0] = 4
    case = dict(draft_token_ids=ids, num_draft_tokens=torch.full((batch,), k, dtype=torch.int32), target_probs=target)
    tokens, accepted = run_op(to_device(case, device), greedy=True)
    assert torch.equal(accepted.cpu(), match_len.to(torch.int32))
    for b in range(batch):
        m = int(match_len[b])
        assert tokens[b].tolist() == best[b, :m].tolist() + [int(best[b, m])] + [-1] * (k - m)


@pytest.mark.parametrize("greedy", [False, True])
def test_ragged_batch_equals_requests_alone(device, greedy):
    gen = torch.Generator().manual_seed(9)
    case = random_case(7, 4, 40, gen, with_draft_probs=not greedy)
    case["num_draft_tokens"] = torch.tensor([0, 4, 1, 3, 0, 2, 4], dtype=torch.int32)
    ids = case["draft_token_ids"]
    ids[ids < 0] = torch.randint(40, (int((ids < 0).sum()),), generator=gen)
    ids[torch.arange(4) >= case["num_draft_tokens"][:, None].long()] = -1
    tokens, accepted = run_op(to_device(case, device), greedy=greedy)
    assert torch.equal(tokens.cpu(), reference_verify(**case, greedy=greedy)[0])
    for b, n in enumerate(case["num_draft_tokens"].tolist()):
        alone = {name: t if t is None else t[b:b + 1] for name, t in case.items()}
        alone["draft_token_ids"] = alone["draft_token_ids"][:, :n].contiguous()
        alone["target_probs"] = alone["target_probs"][:, :n + 1]
        alone["uniform_accept"] = alone["uniform_accept"][:, :n].contiguous()
        if alone["draft_probs"] is not None:
            alone["draft_probs"] = alone["draft_probs"][:, :n]
        tokens_alone, accepted_alone = run_op(to_device(alone, device), greedy=greedy)
        m = int(accepted[b])
        assert m == int(accepted_alone[0]) and m <= n
        assert tokens[b, :m + 1].tolist() == tokens_alone[0, :m + 1].tolist()
        assert (tokens[b, m + 1:] == -1).all()


def test_no_proposals_at_all(device):
    gen = torch.Generator().manual_seed(2)
    target = normalized(torch.rand(5, 1, 16, generator=gen))
    u = torch.rand(5, generator=gen)
    case = dict(draft_token_ids=torch.zeros(5, 0, dtype=torch.int64),
                num_draft_tokens=torch.zeros(5, dtype=torch.int32),
                target_probs=target, uniform_accept=torch.zeros(5, 0), uniform_sample=u)
    tokens, accepted = run_op(to_device(case, device))
    assert accepted.tolist() == [0] * 5
    assert tokens[:, 0].tolist() == [reference_draw(target[b, 0], torch.zeros(16), float(u[b])) for b in range(5)]
    empty = {name: t[:0] for name, t in case.items()}
    assert run_op(to_device(empty, device))[0].shape == (0, 1)


def test_verify_helper_is_reproducible_per_request(device):
    gen = torch.Generator().manual_seed(4)
    case = to_device(random_case(6, 3, 32, gen), device)
    args = [case[name] for name in ("draft_token_ids", "num_draft_tokens", "target_probs", "draft_probs")]

    def generators(seeds):
        return [None if s is None else torch.Generator(device=device).manual_seed(s) for s in seeds]

    first = verify(*args, generators=generators(range(6)))
    assert all(torch.equal(a, b) for a, b in zip(first, verify(*args, generators=generators(range(6)))))
    mixed = verify(*args, generators=generators([0, None, 2, None, 4, None]))
    for b in (0, 2, 4):  # seeded requests do not depend on the unseeded ones
        assert torch.equal(mixed[0][b], first[0][b])
    alone = verify(*[a[2:3] for a in args], generators=generators([2]))
    assert torch.equal(alone[0][0], first[0][2])
    greedy = verify(*args, greedy=True)
    assert torch.equal(greedy[0].cpu(), reference_verify(**{name: case[name].cpu() if case[name] is not None else None
                                                             for name in case}, greedy=True)[0])


# ----------------------------------------------------------------------------- (f) bad input, (g) opcheck

def small_case(device="cpu"):
    gen = torch.Generator().manual_seed(6)
    case = random_case(3, 2, 10, gen)
    case["num_draft_tokens"] = torch.tensor([2, 1, 0], dtype=torch.int32)
    case["draft_token_ids"] = torch.tensor([[1, 2], [3, -1], [-1, -1]])
    return to_device(case, device)


def _set(name, index, value):
    def mutate(case):
        case[name] = case[name].clone()
        case[name][index] = value
    return mutate


def _replace(name, fn):
    return lambda case: case.__setitem__(name, fn(case[name]))


BAD_INPUTS = [
    ("draft_token_ids", _replace("draft_token_ids", lambda t: t.to(torch.int32))),
    ("draft_token_ids", _set("draft_token_ids", (0, 1), 10)),  # outside the vocabulary
    ("draft_token_ids", _set("draft_token_ids", (1, 0), -1)),  # padding inside the count
    ("draft_token_ids", _replace("draft_token_ids", lambda t: t[:, :1])),  # k inconsistent with target
    ("num_draft_tokens", _set("num_draft_tokens", 0, 3)),
    ("num_draft_tokens", _set("num_draft_tokens", 2, -1)),
    ("num_draft_tokens", _replace("num_draft_tokens", lambda t: t.to(torch.int64))),
    ("num_draft_tokens", _replace("num_draft_tokens", lambda t: t[:2])),
    ("target_probs", _replace("target_probs", lambda t: t.to(torch.float16))),
    ("target_probs", _replace("target_probs", lambda t: t[..., ::2])),  # last dimension strided
    ("target_probs", _replace("target_probs", lambda t: t[:, :2])),
    ("target_probs", _replace("target_probs", lambda t: torch.empty(3, 3, 0))),
    ("draft_probs", _replace("draft_probs", lambda t: t[:, :, :9])),
    ("draft_probs", _replace("draft_probs", lambda t: t.double())),
    ("draft_probs", _replace("draft_probs", lambda t: t.to("meta"))),  # another device
    ("uniform_accept", _replace("uniform_accept", lambda t: None)),
    ("uniform_accept", _replace("uniform_accept", lambda t: t.t())),
    ("uniform_sample", _replace("uniform_sample", lambda t: None)),
    ("uniform_sample", _replace("uniform_sample", lambda t: t[:2])),
    ("uniform_sample", _replace("uniform_sample", lambda t: t.to("meta"))),
    ("output_token_ids", lambda c: c.__setitem__("output_token_ids", torch.empty(3, 2, dtype=torch.int64))),
    ("num_accepted", lambda c: c.__setitem__("num_accepted", torch.empty(3, dtype=torch.int64))),
    ("greedy", lambda c: c.__setitem__("greedy", 1)),
]


@pytest.mark.parametrize("name, mutate", BAD_INPUTS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD_INPUTS)])
def test_bad_input_raises_value_error_naming_the_argument(name, mutate):
    case = small_case()
    mutate(case)
    with pytest.raises(ValueError, match=name):
        ops.speculative_verify(**case)


def opcheck_args(mode, device):
    case = small_case(device)
    args = dict(output_token_ids=torch.empty(3, 3, dtype=torch.int64, device=device),
                num_accepted=torch.empty(3, dtype=torch.int32, device=device), greedy=mode == "greedy", **case)
    if mode != "draft_probs":
        args["draft_probs"] = None
    if mode == "greedy":
        args["uniform_accept"] = args["uniform_sample"] = None
    return args


@pytest.mark.parametrize("mode", ["draft_probs", "one_hot", "greedy"])
def test_opcheck(device, mode):
    torch.library.opcheck(torch.ops.fastinfer.speculative_verify.default, (), opcheck_args(mode, device))


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["draft_probs", "greedy"])
def test_captured_in_a_cuda_graph(mode):
    """One launch for the whole batch, no host sync (check_indices=False): the op captures into a CUDA
    graph, and replays over new inputs written into the same buffers give the eager answers."""
    gen = torch.Generator().manual_seed(31)
    cases = [to_device(random_case(16, 4, 300, gen), "cuda") for _ in range(3)]
    static = {name: t.clone() if isinstance(t, torch.Tensor) else t for name, t in cases[0].items()}
    tokens = torch.empty(16, 5, dtype=torch.int64, device="cuda")
    accepted = torch.empty(16, dtype=torch.int32, device="cuda")

    def verify():
        ops.speculative_verify(**static, greedy=mode == "greedy", output_token_ids=tokens, num_accepted=accepted,
                               check_indices=False)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        verify()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        verify()
    for case in cases[1:]:
        for name, t in case.items():
            if isinstance(t, torch.Tensor):
                static[name].copy_(t)
        graph.replay()
        expected_tokens, expected_accepted = run_op(case, greedy=mode == "greedy")
        torch.cuda.synchronize()
        assert torch.equal(tokens, expected_tokens) and torch.equal(accepted, expected_accepted)
