"""Decode steps from static buffers (runner.DecodeGraphs): the CPU runs the static path eagerly, which
checks the padding to buckets, the block-table staging and the slot arithmetic; the `cuda` tests
capture real CUDA graphs and compare them with eager steps."""
from __future__ import annotations

import pytest
import torch

from fastinfer.engine import Engine, EngineConfig
from fastinfer.generate import get_loaded
from fastinfer.llm import LLM
from fastinfer.metadata import SeqChunk
from fastinfer.runner import ModelRunner, default_graph_sizes
from fastinfer.sampling_params import SamplingParams
from models import make_hf_model
from test_engine import GREEDY, drain, make_prompts, run_alone

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def loaded():
    return get_loaded(make_hf_model("llama", seed=11))


def test_token_ids_outside_the_vocabulary_are_refused(loaded):
    """The embedding kernel runs unchecked (a bad id would give a NaN row): both the eager and the
    static path check the ids on the host and raise, as F.embedding did."""
    runner = ModelRunner(loaded.model, num_blocks=8, block_size=16)
    vocab = loaded.model.config.vocab_size
    with pytest.raises(ValueError, match=f"token id {vocab} is outside the vocabulary"):
        runner.run([SeqChunk([5, vocab, 7], 0, [0], all_logits=True)])
    runner.enable_decode_graphs([2], max_model_len=64, capture=False)
    with pytest.raises(ValueError, match="token id -1 is outside the vocabulary"):
        runner.run([SeqChunk([-1], 3, [1])])


def test_dropping_an_engine_frees_its_kv_cache_at_once(loaded):
    """runner.graphs holds the runner weakly: no reference cycle keeps the KV pool (and on a GPU the
    graph pool) alive until the cycle collector runs (fastinfer.generate makes one engine per call)."""
    import gc
    import weakref
    engine = Engine(loaded, EngineConfig(num_blocks=8, decode_graphs=True, graph_sizes=[2]))
    cache = weakref.ref(engine.runner.kv_caches[0])
    gc.disable()
    try:
        del engine
        assert cache() is None
    finally:
        gc.enable()


def test_default_graph_sizes():
    assert default_graph_sizes(1) == [1]
    assert default_graph_sizes(8) == [1, 2, 4, 8]
    assert default_graph_sizes(40) == [1, 2, 4, 8, 16, 32, 40]
    assert default_graph_sizes(256)[-3:] == [224, 240, 256]
    assert default_graph_sizes(4096)[-1] == 512


def test_static_decode_matches_eager_logits(loaded):
    """Same chunks through the eager metadata path and the padded static path: equal logits."""
    model = loaded.model
    eager = ModelRunner(model, num_blocks=32, block_size=16)
    static = ModelRunner(model, num_blocks=32, block_size=16)
    static.enable_decode_graphs([2, 5], max_model_len=200, capture=False)
    prompts = make_prompts(3, seed=3, lo=10, hi=28)
    tables = [[7, 3, 30], [0, 12], [31, 4, 5]]  # scattered blocks, some unused
    prefill = [SeqChunk(p, 0, t) for p, t in zip(prompts, tables)]
    eager.run(prefill)
    static.run(prefill)
    assert static.graphs.num_steps == 0  # prefill stays eager
    for step in range(3):
        chunks = [SeqChunk([5 + step + i], len(p) + step, t) for i, (p, t) in enumerate(zip(prompts, tables))]
        want = eager.run(chunks)
        got = static.run(chunks)  # 3 rows padded to the bucket of 5
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert static.graphs.num_steps == 3
    for a, b in zip(eager.kv_caches, static.kv_caches):  # padding rows wrote nothing
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_static_decode_rejects_bad_chunks(loaded):
    runner = ModelRunner(loaded.model, num_blocks=8, block_size=16)
    runner.enable_decode_graphs([4], max_model_len=64, capture=False)
    with pytest.raises(ValueError, match="block table holds 1 blocks"):
        runner.run([SeqChunk([1], 16, [0])])
    with pytest.raises(ValueError, match=r"outside \[0, 8\)"):
        runner.run([SeqChunk([1], 3, [8])])
    with pytest.raises(ValueError, match="max_model_len=64"):
        runner.run([SeqChunk([1], 64, list(range(5)))])
    # more rows than the largest bucket, or a multi-token chunk: the eager path takes them
    assert not runner.graphs.accepts([SeqChunk([1], 0, [0])] * 5)
    assert not runner.graphs.accepts([SeqChunk([1, 2], 0, [0])])


def test_engine_with_static_decode_matches_alone(loaded):
    """The staggered, preempting batch of test_engine through buckets 1, 3, 8 (odd padding)."""
    prompts = make_prompts(24, seed=0)
    lengths = [5 + i % 13 for i in range(24)]
    alone = [run_alone(loaded, p, n) for p, n in zip(prompts, lengths)]
    engine = Engine(loaded, EngineConfig(num_blocks=12, max_num_seqs=8, max_num_batched_tokens=64,
                                         decode_graphs=True, graph_sizes=[1, 3, 8]))
    assert not engine.runner.graphs.capture  # the CPU runs the static path eagerly
    done = drain(engine, [(str(i), p, n) for i, (p, n) in enumerate(zip(prompts, lengths))], arrivals_per_step=3)
    assert [done[str(i)] for i in range(24)] == alone
    assert engine.runner.graphs.num_steps > 10
    assert engine.blocks.num_in_use == 0


def test_llm_graph_options(loaded):
    with pytest.raises(ValueError, match="cuda_graph_sizes"):
        LLM(loaded, num_blocks=8, cuda_graph_sizes=[0])
    llm = LLM(loaded, num_blocks=8)
    assert llm.engine.runner.graphs is None  # CPU: no graphs unless asked


# ---- CUDA ------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_graph_decode_matches_eager(dtype):
    hf = make_hf_model("llama", seed=4, head_dim=64, hidden_size=256, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=512)
    loaded = get_loaded(hf, dtype=dtype, device="cuda")
    # Contexts stay within 128 keys (prompts <= 80 + 40 tokens), so that the graphs' decode-attention
    # plan (fixed by the bucket and max_model_len 512: splits of 128 keys, the later ones empty) sums
    # every key in the order of the eager steps' plan (one split): the same bits, so bf16 greedy
    # tokens can be compared exactly. (Past 128 keys the graph would merge two splits where the eager
    # step runs one: a last-bit difference that may flip a near-tie; test_cuda_graph_logits_match_eager_step
    # covers that case within bf16 noise.)
    prompts = make_prompts(11, seed=9, lo=3, hi=80)
    params = SamplingParams(max_tokens=40, **GREEDY)
    want, _ = run_engine(loaded, prompts, [params] * 11, num_blocks=128, max_num_seqs=16)  # eager, unpipelined
    for eager in (True, False):
        llm = LLM(loaded, num_blocks=128, max_num_seqs=16, enforce_eager=eager)
        graphs, engine = llm.engine.runner.graphs, llm.engine
        assert engine.config.pipelined_decode
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        assert got == [o.token_ids for o in want], f"enforce_eager={eager}"
        assert engine.num_pipelined_steps > 20
        if not eager:
            assert graphs.capture and sorted(graphs.graphs) == [1, 2, 4, 8, 16] and graphs.num_steps > 20


@pytest.mark.cuda
@pytest.mark.parametrize("max_model_len", [48, 4096])
def test_cuda_graph_logits_match_eager_step(max_model_len):
    """One decode step, replayed vs eager, on the same cache: logits within bf16 noise (the padded
    bucket may pick a different GEMM tile than the eager batch). At max_model_len 4096 the decode
    attention plans many splits, which the graph merges inside the kernel (its semaphores) and the
    eager step with the merge kernel; the semaphores are zero after every replay."""
    hf = make_hf_model("llama", seed=5, head_dim=128, hidden_size=256, num_attention_heads=4, num_key_value_heads=1,
                       max_position_embeddings=4096)
    loaded = get_loaded(hf, dtype=torch.bfloat16, device="cuda")  # the CUDA kernels take head_dim 64 / 128
    runner = ModelRunner(loaded.model, num_blocks=16, block_size=16)
    prompts = make_prompts(3, seed=1, lo=20, hi=40)
    tables = [[2, 9, 4], [11, 0, 7], [5, 13, 1]]
    runner.run([SeqChunk(p, 0, t) for p, t in zip(prompts, tables)])
    chunks = [SeqChunk([9], len(p), t) for p, t in zip(prompts, tables)]
    want = runner.run(chunks).clone()
    runner.enable_decode_graphs([4], max_model_len=max_model_len)
    for step in range(2):
        got = runner.run(chunks)
        assert runner.graphs.num_steps == step + 1
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
        top2 = want.topk(2, dim=-1).values
        decided = (top2[:, 0] - top2[:, 1]) > 0.1  # rows whose choice bf16 noise cannot flip
        assert torch.equal(got.argmax(-1)[decided], want.argmax(-1)[decided])
        torch.cuda.synchronize()
        assert not runner.graphs.semaphores.any()


@pytest.mark.cuda
def test_eager_decode_step_merges_in_kernel(monkeypatch):
    """An eager decode step gets the runner's semaphores: its logits equal those of the same step with
    the merge kernel (FASTINFER_DECODE_MERGE=kernel; the same merge code, so bf16 noise at most), and
    the semaphores stay zero."""
    hf = make_hf_model("llama", seed=6, head_dim=128, hidden_size=256, num_attention_heads=4, num_key_value_heads=1,
                       max_position_embeddings=4096)
    runner = ModelRunner(get_loaded(hf, dtype=torch.bfloat16, device="cuda").model, num_blocks=96, block_size=16)
    prompts = make_prompts(3, seed=2, lo=300, hi=390)  # long enough for several decode splits
    tables = [list(range(i * 25, i * 25 + 25)) for i in range(3)]
    runner.run([SeqChunk(p, 0, t) for p, t in zip(prompts, tables)])
    chunks = [SeqChunk([9], len(p), t) for p, t in zip(prompts, tables)]
    fused = runner.run(chunks).clone()
    assert runner._semaphores is not None and not runner._semaphores.any()
    monkeypatch.setenv("FASTINFER_DECODE_MERGE", "kernel")
    torch.testing.assert_close(fused, runner.run(chunks), rtol=2e-2, atol=2e-2)


# ---- pipelined decode (step n + 1 launched before step n is read back) --------------------------

def run_engine(loaded, prompts, params, **config):
    engine = Engine(loaded, EngineConfig(**{"num_blocks": 64, "max_num_seqs": 8, **config}))
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(str(i), p, sp)
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = engine.pop_finished(out.request_id).outputs[0]
        engine.blocks.check_invariants()
    assert engine.blocks.num_in_use == 0
    return [done[str(i)] for i in range(len(prompts))], engine


@pytest.mark.parametrize("graphs", [False, True])
def test_pipelined_decode_matches_plain(loaded, graphs):
    """Greedy and seeded sampling, stop tokens, min_tokens and max_tokens of every length: the same
    tokens and finish reasons as the unpipelined engine; most decode steps were launched ahead."""
    prompts = make_prompts(10, seed=21, lo=2, hi=30)
    plain_greedy, _ = run_engine(loaded, prompts, [SamplingParams(max_tokens=30, **GREEDY)] * 10)
    stops = [out.token_ids[4 + i] for i, out in enumerate(plain_greedy)]  # a token each greedy run emits
    params = [SamplingParams(max_tokens=5 + 3 * i, temperature=0.0 if i % 2 else 0.9, seed=i,
                             stop_token_ids=[stops[i]] if i % 3 else None, min_tokens=2 if i == 4 else 0)
              for i in range(10)]
    want, _ = run_engine(loaded, prompts, params)
    got, engine = run_engine(loaded, prompts, params, pipelined_decode=True, decode_graphs=graphs,
                             graph_sizes=[2, 8] if graphs else None)
    assert [(o.token_ids, o.finish_reason) for o in got] == [(o.token_ids, o.finish_reason) for o in want]
    assert any(o.finish_reason == "stop" for o in got)
    assert engine.num_pipelined_steps > 20


def test_pipelined_decode_with_arrivals_preemption_and_abort(loaded):
    prompts = make_prompts(24, seed=0)
    lengths = [5 + i % 13 for i in range(24)]
    alone = [run_alone(loaded, p, n) for p, n in zip(prompts, lengths)]
    engine = Engine(loaded, EngineConfig(num_blocks=12, max_num_seqs=8, max_num_batched_tokens=64,
                                         pipelined_decode=True))
    done = drain(engine, [(str(i), p, n) for i, (p, n) in enumerate(zip(prompts, lengths))], arrivals_per_step=3)
    assert [done[str(i)] for i in range(24)] == alone
    assert engine.num_pipelined_steps > 0
    # abort while a step is in flight: nothing of the aborted request is lost or leaked
    engine.add_request("a", prompts[0], SamplingParams(max_tokens=40, **GREEDY))
    engine.add_request("b", prompts[1], SamplingParams(max_tokens=40, **GREEDY))
    while engine._inflight is None:
        engine.step()
    engine.abort("a")
    while engine.has_unfinished():
        engine.step()
    assert engine.pop_finished("a").outputs[0].finish_reason == "abort"
    assert engine.pop_finished("b").outputs[0].token_ids == run_alone(loaded, prompts[1], 40)
    assert engine.blocks.num_in_use == 0


def test_static_tables_clear_stale_blocks(loaded):
    """A row whose table shrinks (a new, shorter sequence in that row) or turns into padding keeps
    no block of the previous step in its staging row: the copied table is exactly the used blocks."""
    runner = ModelRunner(loaded.model, num_blocks=16, block_size=16)
    runner.enable_decode_graphs([1, 4], max_model_len=128, capture=False)
    g = runner.graphs
    runner.run([SeqChunk([1], 40, [3, 4, 5]), SeqChunk([1], 20, [6, 7])])
    assert g.np_tables[0, :3].tolist() == [3, 4, 5] and g.np_tables[1, :2].tolist() == [6, 7]
    runner.run([SeqChunk([2], 5, [9])])  # bucket 1: row 0 shrinks to one block
    assert g.np_tables[0].tolist() == [9] + [0] * (g.width - 1)
    runner.run([SeqChunk([2], 5, [9]), SeqChunk([3], 5, [8])])  # bucket 4: rows 2, 3 padding
    assert not g.np_tables[1, 1:].any() and not g.np_tables[2:4].any()
    assert g.np_lens[:4].tolist() == [6, 6, 1, 1] and g.np64[2, 2:4].tolist() == [-1, -1]


def test_pipelined_decode_reports_a_finished_request_once(loaded):
    """A request that finishes while the next step is in flight is not reported again by that step
    (an Engine user who pops later, or never, saw its final output twice)."""
    prompts = make_prompts(3, seed=5, lo=4, hi=12)
    greedy, _ = run_engine(loaded, prompts, [SamplingParams(max_tokens=20, **GREEDY)] * 3)
    params = [SamplingParams(max_tokens=20, stop_token_ids=[o.token_ids[3 + 2 * i]], **GREEDY)  # unforeseeable stops
              for i, o in enumerate(greedy)]
    finals = {}
    for pipelined in (False, True):
        engine = Engine(loaded, EngineConfig(num_blocks=64, max_num_seqs=8, pipelined_decode=pipelined))
        for i, (p, sp) in enumerate(zip(prompts, params)):
            engine.add_request(str(i), p, sp)
        reports = []
        while engine.has_unfinished():
            reports += [o.request_id for o in engine.step() if o.finished]  # nothing popped
        finals[pipelined] = sorted(reports)
    assert finals[True] == finals[False] == ["0", "1", "2"]


# ---- programmatic dependent launch (FASTINFER_PDL=1) ------------------------------------------------

@pytest.mark.cuda
@pytest.mark.sm90
@pytest.mark.parametrize("enforce_eager", [True, False])
def test_pdl_decode_matches_plain_launches(monkeypatch, enforce_eager):
    """With FASTINFER_PDL=1 the decode-path kernels may start before the previous one ends (and wait for
    it inside): the same logits, bit for bit, and the same tokens as plain launches, eager and graphed;
    and the launches did carry the attribute (fastinfer._C.pdl_launches counts them)."""
    from fastinfer import _C
    hf = make_hf_model("llama", seed=4, head_dim=128, hidden_size=256, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=512)
    loaded = get_loaded(hf, dtype=torch.bfloat16, device="cuda")
    prompts = make_prompts(11, seed=9, lo=3, hi=90)
    params = SamplingParams(max_tokens=40, **GREEDY)
    tokens, logits, launches = {}, {}, {}
    for pdl in ("0", "1"):
        monkeypatch.setenv("FASTINFER_PDL", pdl)
        before = _C.pdl_launches()
        llm = LLM(loaded, num_blocks=128, max_num_seqs=16, enforce_eager=enforce_eager)
        tokens[pdl] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        runner = ModelRunner(loaded.model, num_blocks=16, block_size=16)
        tables = [[2, 9, 4], [11, 0, 7], [5, 13, 1]]
        runner.run([SeqChunk(p[:40], 0, t) for p, t in zip(prompts, tables)])
        chunks = [SeqChunk([9], len(p[:40]), t) for p, t in zip(prompts, tables)]
        if not enforce_eager:
            runner.enable_decode_graphs([4], max_model_len=48)
        logits[pdl] = runner.run(chunks).clone()
        launches[pdl] = _C.pdl_launches() - before
    assert launches["0"] == 0 and launches["1"] > 10, launches
    assert torch.equal(logits["1"], logits["0"])
    assert tokens["1"] == tokens["0"]


@pytest.mark.cuda
def test_cuda_graph_decode_with_l2_prefetch_is_the_same(monkeypatch):
    """FASTINFER_GEMV_PREFETCH_MB (gemv.cuh, "L2 prefetch across kernels") is read when the graphs are
    captured; the prefetch is a hint, so graphed greedy decoding gives the same tokens with and without
    it, and the same logits bit for bit on one eager step."""
    hf = make_hf_model("llama", seed=6, head_dim=128, hidden_size=512, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=1024, num_hidden_layers=3)
    loaded = get_loaded(hf, dtype=torch.bfloat16, device="cuda")
    prompts = make_prompts(5, seed=3, lo=3, hi=40)
    params = SamplingParams(max_tokens=24, **GREEDY)
    got = {}
    for mb in ("0", "8"):
        monkeypatch.setenv("FASTINFER_GEMV_PREFETCH_MB", mb)
        llm = LLM(loaded, num_blocks=64, max_num_seqs=8)
        got[mb] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        assert llm.engine.runner.graphs.num_steps > 10
        del llm
    assert got["8"] == got["0"]
    runner = ModelRunner(loaded.model, num_blocks=16, block_size=16)
    tables = [[2, 9, 4], [11, 0, 7]]
    runner.run([SeqChunk(p, 0, t) for p, t in zip(prompts[:2], tables)])
    chunks = [SeqChunk([9], len(p), t) for p, t in zip(prompts[:2], tables)]
    logits = {}
    for mb in ("0", "8", "0.001"):  # 0.001 MB: under 16 bytes a row, nothing issued
        monkeypatch.setenv("FASTINFER_GEMV_PREFETCH_MB", mb)
        logits[mb] = runner.run(chunks).clone()
    assert torch.equal(logits["8"], logits["0"]) and torch.equal(logits["0.001"], logits["0"])
