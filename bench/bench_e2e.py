"""End-to-end decode speed of a Llama-3-8B-shaped model: fastinfer against HF transformers, one run.

    python bench/bench_e2e.py [--out PATH] [--mode short|full] [--batches 1 8 32 128] [--quant bf16 int4 fp8]

Model: random weights (HF's own initialisation), Llama-3-8B's shape (hidden 4096, 32 layers, 32 query
/ 8 KV heads, FFN 14336, vocab 128256), bf16, built on the GPU; fastinfer loads the same weights
from the HF object (quantizing them for int4 / fp8). No download, no tokenizer: prompts are random
token ids and every request ignores EOS.

Decode tokens/s at batch B: B prompts of --prompt-len tokens are prefilled, a few decode steps
warm up, then --steps decode steps are timed on the host clock (each ends with the sampled tokens
back on the host, so launch gaps, sampling and Python are inside the figure). fastinfer runs through
its engine (LLM.engine.step), with CUDA graphs (the default) and with enforce_eager=True, and for bf16
on a GPU also with FASTINFER_PDL=1 (programmatic dependent launch, csrc/include/fastinfer/common.cuh:
off by default until this row shows it helps) and, at batches <= 16, "unfused": FASTINFER_FUSED_NORM=0
and FASTINFER_DECODE_MERGE=kernel (a kernel per residual add + RMSNorm, per rotary + KV write and
per split-KV merge instead of their fusion into the GEMVs and the attention kernel: what the fusions
save). Order (a time limit keeps what came first): each format's graphed row, then the variants not
yet measured (VARIANT_ROWS: bf16 with each GEMV prefetching the next one's weight into L2 (8 MB; 16 MB
last), fp8 decode steps on the fused GEMVs with e4m3 weights and 16-bit activations (W8A16), bf16 with the RMSNorm-prologue preload, int4 on the stream-K GEMV, int4 on the warpgroup-MMA
kernel above 8 rows (auto_wgmma), fp8 on the decode GEMV, fp8 with a quantization kernel per GEMM again
instead of the norms / SwiGLU emitting FP8), then bf16's PDL, unfused and eager rows,
then the offline run. HF runs
model.generate for 1 and for 1 + steps new tokens (min_new_tokens = max), each twice, and the
difference of the faster runs is its decode time: eager (dynamic cache), and in full mode static cache + torch.compile
(generate compiles the forward itself when the cache is static: transformers' automatic compilation
with its default CompileConfig), warmed up (compiled) before timing.
Roofline: a decode step must read every weight once (embedding rows aside) and each sequence's KV:
tokens/s <= B * copy bandwidth / (weight bytes + B * KV bytes per sequence), the copy bandwidth
measured in the same run; "of roofline" is the measured rate over that.
Offline throughput: --requests requests with ShareGPT-like lengths (log-normal, input median 200
clipped to [4, 1024], output median 150 clipped to [4, 512], seeded), all submitted at once to the
engine (max_num_seqs 256); TTFT = first token time - submit time; TPOT = (finish - first token) /
(output tokens - 1). fastinfer only (HF generate has no continuous batching to compare with).
Weight formats: bf16, int4 (round-to-nearest, group 128, quantized on the GPU while loading) and
fp8 (per-channel e4m3, the sm_90a GEMM); the eager baseline and the offline run use bf16.
short mode (bench/gpu_check.sh): 4 batch sizes, 16 timed steps, HF eager at batches 1 and 32 only,
no torch.compile peer, 200 offline requests. full mode: 64 steps, HF eager and compile at 1 and 32
(--hf-batches), 1000 requests; minutes of compilation. --tiny: a 2-layer small model (CPU smoke test).
Profile (GPU): for the plain, "unfused" and "+ PDL" bf16 engines, the plain int4 and fp8 ones and fp8 W8A16, 4
graphed batch-1 decode steps under torch.profiler: kernels per step, their summed time against the
step's GPU span, the gaps between consecutive kernels, the top kernels.
Writes the JSON fragment, and a PNG chart (tokens/s against batch, with the roofline) beside it.
Where matplotlib is missing (the GPU machine), the fragment keeps what the chart needs (rows and the
roofline) and `python bench/bench_e2e.py --chart-from PATH/e2e.json` draws it later, on any machine
with matplotlib (the test extra installs it), and records it in the fragment.
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import random
import statistics
import time
from pathlib import Path

import torch

import common

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                 rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
TINY = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=64, max_position_embeddings=2048)


# The kernel settings a fastinfer row depends on, at their defaults; a variant overrides some of them.
PINNED = {"FASTINFER_PDL": "0", "FASTINFER_FUSED_NORM": "1", "FASTINFER_FUSED_ROPE": "1", "FASTINFER_DECODE_MERGE": "auto",
          "FASTINFER_GEMV_NORM_PRELOAD": "off", "FASTINFER_INT4_KERNEL": "auto", "FASTINFER_FP8_GEMV": "off",
          "FASTINFER_FP8_MULTICAST": "off", "FASTINFER_FP8_PROMOTE": "serial", "FASTINFER_ATTN_KV_LOAD": "cp_async",
          "FASTINFER_ARGMAX": "kernel", "FASTINFER_GEMV_PREFETCH_MB": "0", "FASTINFER_FP8_FUSED_QUANT": "1",
          "FASTINFER_FP8_DECODE": "w8a8"}
# Kernel variants written but not yet measured (bench/PERF_NOTES.md), one row each after the plain rows.
VARIANT_ROWS = [("bf16", " + L2 prefetch 8 MB", {"FASTINFER_GEMV_PREFETCH_MB": "8"}),
                ("fp8", " W8A16 decode", {"FASTINFER_FP8_DECODE": "w8a16"}),
                ("bf16", " + norm preload", {"FASTINFER_GEMV_NORM_PRELOAD": "on"}),
                ("int4", " stream-K", {"FASTINFER_INT4_KERNEL": "small_streamk"}),
                ("int4", " wgmma", {"FASTINFER_INT4_KERNEL": "auto_wgmma"}),
                ("bf16", " + torch argmax", {"FASTINFER_ARGMAX": "torch"}),
                ("fp8", " GEMV", {"FASTINFER_FP8_GEMV": "on"}),
                ("fp8", " unfused quant", {"FASTINFER_FP8_FUSED_QUANT": "0"}),
                ("bf16", " + L2 prefetch 16 MB", {"FASTINFER_GEMV_PREFETCH_MB": "16"})]


def restore_env(saved: dict) -> None:
    """Back to the caller's values of the PINNED settings (unset where they were unset)."""
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def kv_bytes_per_token(model) -> int:
    """KV-cache bytes one token of one sequence takes (all layers, K and V) in the model's dtype."""
    cfg = model.config
    return cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * model.dtype.itemsize


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_hf_model(shape: dict, device: torch.device, dtype: torch.dtype):
    import transformers
    cfg = transformers.LlamaConfig(**shape, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = transformers.LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(previous)
    return model


def read_bytes(model) -> int:
    """Bytes a decode step reads of the fastinfer model's weights: every tensor of every layer, the
    final norm and the LM head (the embedding is read a row per token; a tied head counts once)."""
    seen, total = set(), 0

    def add(obj, depth=0):
        nonlocal total
        if isinstance(obj, torch.Tensor):
            if obj.data_ptr() not in seen:
                seen.add(obj.data_ptr())
                total += obj.numel() * obj.element_size()
        elif depth < 3 and hasattr(obj, "__dict__"):
            for value in vars(obj).values():
                add(value, depth + 1)
    for layer in model.layers:
        add(layer)
    add(model.norm)
    add(model.lm_head)
    return total


def random_prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(count)]


# ---- fastinfer --------------------------------------------------------------------------------------

def prefill_steps(batch: int, prompt_len: int) -> int:
    """Engine steps that prefill `batch` prompts under bench_e2e's token budget (see measure())."""
    return -(-batch * prompt_len // token_budget(prompt_len))


def token_budget(prompt_len: int) -> int:
    return max(8192, prompt_len)


def fastinfer_decode(llm, batch: int, prompt_len: int, steps: int, warm: int) -> dict:
    from fastinfer.sampling_params import SamplingParams
    engine = llm.engine
    vocab = engine.loaded.model.config.vocab_size
    # headroom: a sequence prefilled in an earlier chunk of the token budget decodes while the rest
    # prefill, so sequences start the timed steps with different output lengths (max_len allows it)
    params = SamplingParams(max_tokens=steps + warm + 4 + prefill_steps(batch, prompt_len), temperature=0.0,
                            ignore_eos=True)
    ids = [f"decode-{batch}-{i}" for i in range(batch)]
    for rid, prompt in zip(ids, random_prompts(batch, prompt_len, vocab, seed=batch)):
        engine.add_request(rid, prompt, params)
    seqs = [engine.requests[r].seqs[0] for r in ids]
    while any(not s.output_token_ids for s in seqs):  # prefill (chunked by the token budget)
        engine.step()
    for _ in range(warm):
        engine.step()
    graphs = engine.runner.graphs
    replays = graphs.num_steps if graphs is not None else 0
    device = engine.runner.device
    before = [len(s.output_token_ids) for s in seqs]
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync(device)
    seconds = time.perf_counter() - t0
    graphed = (graphs.num_steps - replays) if graphs is not None else 0
    if any(len(s.output_token_ids) != n + steps for s, n in zip(seqs, before)):
        raise RuntimeError("a timed step was not a decode step of every sequence (preempted or finished early)")
    for rid in ids:
        engine.abort(rid)
        engine.pop_finished(rid)
    return {"seconds": seconds, "tok_s": batch * steps / seconds, "tpot_ms": 1e3 * seconds / steps,
            "graph_steps": graphed}


def summarize_kernels(kernels: list[tuple[str, float, float]], steps: int, top: int = 12) -> dict:
    """Per decode step, from (name, start us, end us) of every GPU kernel of `steps` steps: how many,
    their summed time, the GPU span (first start to last end, gaps included) and the kernels that
    take the most time (names without template arguments or parameter lists). Also the gaps between
    consecutive kernels (start minus the previous kernel's end, in start order): without PDL each
    kernel starts after the last one ends; with FASTINFER_PDL=1 a dependent kernel may start while
    its predecessor runs (a negative gap), and its measured time then includes its wait."""
    if not kernels:
        return {"kernels_per_step": 0}
    busy = sum(end - start for _, start, end in kernels)
    span = max(end for _, _, end in kernels) - min(start for _, start, _ in kernels)
    ordered = sorted(kernels, key=lambda k: k[1])
    gaps = [b[1] - a[2] for a, b in zip(ordered, ordered[1:])]
    groups: dict[str, list[float]] = {}
    for name, start, end in kernels:
        short = name.split("<")[0].split("(")[0].strip()
        short = short.replace("void ", "", 1) if short.startswith("void ") else short
        groups.setdefault(short, []).append(end - start)
    ranked = sorted(groups.items(), key=lambda kv: -sum(kv[1]))[:top]
    return {"kernels_per_step": len(kernels) / steps, "kernel_us_per_step": busy / steps,
            "span_us_per_step": span / steps, "busy": busy / span if span > 0 else None,
            "gap_us_mean": sum(gaps) / len(gaps) if gaps else None,
            # the median too: the gaps between the profiled steps (host work, the sampler) are few but long
            "gap_us_median": statistics.median(gaps) if gaps else None,
            "overlapped": sum(g < 0 for g in gaps) / len(gaps) if gaps else None,
            "top": [{"kernel": k, "per_step": len(v) / steps, "us_per_step": sum(v) / steps} for k, v in ranked]}


def profile_decode(llm, prompt_len: int, steps: int = 4) -> dict:
    """One sequence decoding: the kernels of `steps` graphed steps under torch.profiler (what a
    batch-1 step spends its time on, and how many launches it makes)."""
    from torch.profiler import ProfilerActivity, profile

    from fastinfer.sampling_params import SamplingParams
    engine = llm.engine
    params = SamplingParams(max_tokens=steps + 8, temperature=0.0, ignore_eos=True)
    engine.add_request("profile", random_prompts(1, prompt_len, engine.loaded.model.config.vocab_size, seed=7)[0],
                       params)
    seq = engine.requests["profile"].seqs[0]
    while not seq.output_token_ids:
        engine.step()
    for _ in range(2):
        engine.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    engine.abort("profile")
    engine.pop_finished("profile")
    kernels = [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA
               and not e.name.lower().startswith(("memcpy", "memset"))]
    return summarize_kernels(kernels, steps)


def offline_throughput(llm, num_requests: int, seed: int = 0) -> dict:
    """All requests submitted at once; per-request TTFT / TPOT from the step loop's clock."""
    from fastinfer.sampling_params import SamplingParams
    engine = llm.engine
    vocab = engine.loaded.model.config.vocab_size
    rng = random.Random(seed)

    def lognormal(median, sigma, lo, hi):
        return int(min(hi, max(lo, round(rng.lognormvariate(math.log(median), sigma)))))
    lengths = [(lognormal(200, 0.9, 4, 1024), lognormal(150, 0.9, 4, 512)) for _ in range(num_requests)]
    device = engine.runner.device
    sync(device)
    t0 = time.perf_counter()
    for i, (n_in, n_out) in enumerate(lengths):
        engine.add_request(f"offline-{i}", [rng.randrange(3, vocab) for _ in range(n_in)],
                           SamplingParams(max_tokens=n_out, temperature=0.0, ignore_eos=True))
    first: dict[str, float] = {}
    finish: dict[str, float] = {}
    while engine.has_unfinished():
        outputs = engine.step()
        now = time.perf_counter() - t0
        for out in outputs:
            if out.outputs[0].token_ids and out.request_id not in first:
                first[out.request_id] = now
            if out.finished:
                finish[out.request_id] = now
                engine.pop_finished(out.request_id)
    seconds = time.perf_counter() - t0
    if len(finish) != num_requests:
        raise RuntimeError(f"{num_requests - len(finish)} requests never finished")
    tpot = [(finish[r] - first[r]) / (n_out - 1) for r, (_, n_out) in
            zip((f"offline-{i}" for i in range(num_requests)), lengths) if n_out > 1]
    ttft = list(first.values())
    out_tokens, in_tokens = sum(o for _, o in lengths), sum(i for i, _ in lengths)
    return {"requests": num_requests, "seconds": seconds, "req_s": num_requests / seconds,
            "out_tok_s": out_tokens / seconds, "total_tok_s": (in_tokens + out_tokens) / seconds,
            "ttft_ms_median": 1e3 * statistics.median(ttft), "ttft_ms_p90": 1e3 * _quantile(ttft, 0.9),
            "tpot_ms_median": 1e3 * statistics.median(tpot), "tpot_ms_p90": 1e3 * _quantile(tpot, 0.9),
            "input_tokens": in_tokens, "output_tokens": out_tokens}


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ---- HF transformers --------------------------------------------------------------------------------

def hf_decode(model, batch: int, prompt_len: int, steps: int, compiled: bool) -> dict:
    vocab = model.config.vocab_size
    ids = torch.tensor(random_prompts(batch, prompt_len, vocab, seed=batch), device=model.device)
    mask = torch.ones_like(ids)
    extra = {"cache_implementation": "static"} if compiled else {}

    def run(new_tokens: int) -> float:
        sync(model.device)
        t0 = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, pad_token_id=0, **extra)
        sync(model.device)
        return time.perf_counter() - t0
    run(1 + steps)  # warm-up (and, compiled, the compilation for this batch size)
    if compiled:
        # transformers compiles the forward by itself only where it judges it can (a CUDA device, a
        # compilable cache; GenerationMixin._valid_auto_compile_criteria) and keeps the result in
        # _compiled_call: without it this row would be an uncompiled static cache under a compiled name.
        if getattr(model, "_compiled_call", None) is None:
            raise RuntimeError("transformers did not compile the forward (no model._compiled_call after a "
                               "static-cache generate): not a compiled peer")
        run(1 + steps)
    # The decode time is a difference of two timings: the faster of two runs of each, interleaved, so
    # that host noise (a busy CPU) does not make it small or negative.
    long_runs, short_runs = [], []
    for _ in range(2):
        short_runs.append(run(1))
        long_runs.append(run(1 + steps))
    seconds = min(long_runs) - min(short_runs)
    if seconds <= 0:
        raise RuntimeError(f"HF decode time not measurable: {steps} more tokens took {seconds * 1e3:.2f} ms "
                           f"(runs {long_runs} vs {short_runs}); use more --steps")
    return {"seconds": seconds, "tok_s": batch * steps / seconds, "tpot_ms": 1e3 * seconds / steps}


# ---- chart ------------------------------------------------------------------------------------------

def write_chart(path: Path, rows: list[dict], roofline: dict[str, dict[int, float]], title: str) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # the chart is optional; the table is the result
        return f"no chart: matplotlib unavailable ({type(exc).__name__})"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for impl in dict.fromkeys(r["impl"] for r in rows if r.get("tok_s")):
        pts = sorted((r["batch"], r["tok_s"]) for r in rows if r["impl"] == impl and r.get("tok_s"))
        ax.plot(*zip(*pts), marker="o", label=impl)
    for quant, curve in roofline.items():
        pts = sorted(curve.items())
        ax.plot(*zip(*pts), linestyle="--", color="gray", label=f"roofline ({quant})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch (sequences decoding)")
    ax.set_ylabel("output tokens/s")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


# ---- main -------------------------------------------------------------------------------------------

COLUMNS = [("impl", "impl", ""), ("batch", "batch", "d"), ("tok_s", "tokens/s", ".1f"), ("tpot_ms", "ms / step", ".2f"),
           ("roofline_tok_s", "roofline tok/s", ".1f"), ("of_roofline", "of roofline", ".1%"),
           ("vs_hf_eager", "vs HF eager", ".2f"), ("vs_hf_compile", "vs HF compile", ".2f"), ("note", "note", "")]
OFFLINE_COLUMNS = [("impl", "impl", ""), ("requests", "requests", "d"), ("seconds", "s", ".1f"),
                   ("req_s", "req/s", ".2f"), ("out_tok_s", "output tok/s", ".0f"), ("total_tok_s", "total tok/s", ".0f"),
                   ("ttft_ms_median", "TTFT p50 ms", ".0f"), ("ttft_ms_p90", "TTFT p90 ms", ".0f"),
                   ("tpot_ms_median", "TPOT p50 ms", ".1f"), ("tpot_ms_p90", "TPOT p90 ms", ".1f")]


def chart_from(path: Path) -> int:
    """Draws the chart of a saved e2e fragment (e.g. a GPU run without matplotlib) beside it and records
    it in the fragment; 1 if it cannot."""
    import json
    frag = json.loads(path.read_text())
    roofline = {q: {int(b): v for b, v in curve.items()} for q, curve in (frag.get("roofline") or {}).items()}
    chart = path.with_suffix(".png")
    problem = write_chart(chart, frag["rows"], roofline, frag.get("title", "decode"))
    if problem:
        print(problem)
        return 1
    frag["chart"] = chart.name
    frag["notes"] = [n for n in frag.get("notes", []) if not n.startswith(("no chart", "chart:"))] + \
        [f"chart: {chart.name}"]
    path.write_text(json.dumps(frag, indent=1) + "\n")
    print(f"wrote {chart}")
    return 0


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chart-from", type=Path, default=None,
                   help="draw the chart of a saved e2e JSON fragment and exit (no benchmark runs)")
    p.add_argument("--out", default=None, help="JSON path (default $OUT/bench/e2e.json)")
    p.add_argument("--mode", choices=("short", "full"), default="short")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 128])
    p.add_argument("--hf-batches", type=int, nargs="+", default=[1, 32], help="batches the HF peers run")
    p.add_argument("--quant", nargs="+", default=None, choices=("bf16", "int4", "fp8"),
                   help="fastinfer weight formats (default: all three; the eager baseline and the offline run use bf16)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--requests", type=int, default=None)
    p.add_argument("--no-hf", action="store_true", help="skip the HF peers")
    p.add_argument("--tiny", action="store_true", help="2-layer small model: a smoke test, also on CPU")
    p.add_argument("--device", default="cuda")
    args = p.parse_args(argv)
    full = args.mode == "full"
    args.steps = args.steps or (64 if full else 16)
    args.requests = args.requests if args.requests is not None else (1000 if full else 200)
    args.quant = args.quant or ["bf16", "int4", "fp8"]
    args.hf_compile = full
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.chart_from is not None:
        return chart_from(args.chart_from)
    device = torch.device(args.device)
    if device.type == "cuda":
        common.require_cuda_build()
    elif not args.tiny:
        common.cannot_run("the Llama-3-8B shape needs a GPU (--tiny runs on the CPU)")
    from fastinfer.generate import get_loaded
    from fastinfer.llm import LLM
    try:
        import transformers  # noqa: F401
    except ImportError:
        common.cannot_run("transformers is not installed (the model is built as an HF object)")

    shape = TINY if args.tiny else LLAMA3_8B
    dtype = torch.bfloat16
    copy = common.copy_bandwidth_gbps(flush=common.L2Flusher()) if device.type == "cuda" else None
    bw = copy["gbps"] * 1e9 if copy else None
    if copy:
        print(f"device-to-device copy: {copy['gbps']:.0f} GB/s")
    t_build = time.perf_counter()
    hf = make_hf_model(shape, device, dtype)
    loaded = {q: get_loaded(hf, dtype=dtype, device=device, quantization=None if q == "bf16" else q, cache=False)
              for q in args.quant}
    print(f"models built in {time.perf_counter() - t_build:.1f} s: HF bf16 + fastinfer {', '.join(args.quant)}")

    rows, errors, notes = [], [], []
    warm = 3

    def record(impl, batch, result=None, error=None):
        row = {"impl": impl, "batch": batch, **(result or {})}
        if error is not None:
            row["note"] = f"error: {error}"[:120]
            errors.append(f"{impl} batch {batch}: {error}")
            print("ERROR", errors[-1])
        else:
            print(f"{impl:28s} batch {batch:4d}: {row['tok_s']:9.1f} tok/s  {row['tpot_ms']:7.2f} ms/step")
        rows.append(row)

    roofline: dict[str, dict[int, float]] = {}
    offline = []
    max_batch = max(args.batches)
    saved_env = {name: os.environ.get(name) for name in PINNED}
    profiles: dict[str, dict] = {}  # impl -> summarize_kernels of a batch-1 graphed step
    # SIGINT (gpu_check's time limit) stops the measuring, not the report: what was measured is written.
    try:
        # HF peers first: they need the HF object, which is freed before fastinfer sizes its KV pools.
        if not args.no_hf:
            peers = [("HF eager", False)] + ([("HF static+compile", True)] if args.hf_compile else [])
            for impl, compiled in peers:
                for b in args.hf_batches:
                    try:
                        record(impl, b, hf_decode(hf, b, args.prompt_len, args.steps, compiled))
                    except Exception as exc:
                        record(impl, b, error=f"{type(exc).__name__}: {exc}")
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
        else:
            notes.append("HF peers skipped (--no-hf)")
        del hf
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

        # Rows in priority order, should gpu_check's time limit cut the run short: the plain graphed
        # row of every weight format first (issue targets: bf16's roofline fraction, INT4 against bf16),
        # then bf16's diagnostic variants: programmatic dependent launch (common.cuh; off by default
        # until measured here), no fusions (norms and rotary into the GEMVs, models/llama.py, batches
        # <= 16 only; the split merge into decode attention), eager; then the offline run (bf16).
        unfused = {"FASTINFER_FUSED_NORM": "0", "FASTINFER_DECODE_MERGE": "kernel"}
        plan = [(q, "", False, {}) for q in args.quant]
        plan += [(q, suffix, False, env) for q, suffix, env in VARIANT_ROWS if q in args.quant]
        if "bf16" in args.quant:
            plan += [("bf16", " + PDL", False, {"FASTINFER_PDL": "1"}), ("bf16", " unfused", False, unfused),
                     ("bf16", " eager", True, {})]
        last_use = {q: max(i for i, row in enumerate(plan) if row[0] == q) for q in args.quant}
        max_len = args.prompt_len + args.steps + warm + 8 + prefill_steps(max_batch, args.prompt_len)

        def measure(q: str, suffix: str, eager: bool, env: dict, batches: list[int]) -> None:
            """One row: an engine on format q with the row's settings, its profile (bf16 plain, unfused
            and + PDL, int4 and fp8 plain), decode tokens/s at each batch; the caller's settings restored
            after it."""
            impl = f"fastinfer {q}{suffix}"
            # read at every launch / forward: every row pins them all (the defaults, then its own)
            os.environ.update({**PINNED, **env})
            try:
                blocks = max_batch * -(-max_len // 16) + 64
                llm = LLM(loaded[q], num_blocks=blocks, max_num_seqs=max_batch, max_model_len=max_len,
                          max_num_batched_tokens=token_budget(args.prompt_len), enforce_eager=eager,
                          cuda_graph_sizes=sorted(set(batches)))
            except Exception as exc:
                record(impl, max_batch, error=f"LLM: {type(exc).__name__}: {exc}")
                restore_env(saved_env)
                return
            # bf16 plain, unfused and + PDL; int4 and fp8 plain (where their steps spend the time)
            if (suffix in ("", " unfused", " + PDL", " + L2 prefetch 8 MB") if q == "bf16"
                else suffix in ("", " W8A16 decode") if q == "fp8" else suffix == "") \
                    and device.type == "cuda":
                try:  # what one graphed batch-1 step launches and spends its time on
                    profiles[impl] = profile_decode(llm, args.prompt_len)
                except Exception as exc:
                    errors.append(f"profile {impl}: {type(exc).__name__}: {exc}")
            for b in batches:
                try:
                    r = fastinfer_decode(llm, b, args.prompt_len, args.steps, warm)
                    if bw:
                        r["roofline_tok_s"] = roofline[q][b]
                        r["of_roofline"] = r["tok_s"] / roofline[q][b]
                    if not eager and device.type == "cuda" and r["graph_steps"] != args.steps:
                        r["note"] = f"only {r['graph_steps']} of {args.steps} steps replayed a graph"
                    record(impl, b, r)
                except Exception as exc:
                    record(impl, b, error=f"{type(exc).__name__}: {exc}")
            del llm
            restore_env(saved_env)
            free_memory()

        def free_memory() -> None:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

        for i, (q, suffix, eager, env) in enumerate(plan):
            if not suffix:  # the format's first row
                model = loaded[q].model
                weights = read_bytes(model)
                context = args.prompt_len + warm + args.steps // 2  # mean context over the timed steps
                if bw:
                    roofline[q] = {b: b * bw / (weights + b * context * kv_bytes_per_token(model))
                                   for b in args.batches}
                notes.append(f"fastinfer {q}: {weights / 1e9:.2f} GB of weights read per decode step")
                del model
            batches = [b for b in args.batches if b <= 16] if "FASTINFER_FUSED_NORM" in env else args.batches
            if batches and not (env and device.type != "cuda"):
                measure(q, suffix, eager, env, batches)
            if i == last_use[q] and not (q == "bf16" and args.requests):
                loaded[q] = None  # done with this format (bf16 stays for the offline run)
                free_memory()
        if args.requests and "bf16" in args.quant:
            try:
                free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 2 << 30
                blocks = int(0.6 * free) // (16 * kv_bytes_per_token(loaded["bf16"].model))
                llm = LLM(loaded["bf16"], num_blocks=blocks, max_num_seqs=256, max_model_len=2048)
                r = offline_throughput(llm, args.requests)
                offline.append({"impl": "fastinfer bf16", **r})
                print(f"offline: {r['requests']} requests in {r['seconds']:.1f} s, {r['out_tok_s']:.0f} output tok/s")
                del llm
            except Exception as exc:
                errors.append(f"offline bf16: {type(exc).__name__}: {exc}")
                print("ERROR", errors[-1])
            loaded["bf16"] = None
            free_memory()
    except KeyboardInterrupt:
        errors.append("interrupted (SIGINT, e.g. gpu_check's time limit): the rows are what was measured by then")
        print("ERROR", errors[-1])
        restore_env(saved_env)

    hf_rates = {(r["impl"], r["batch"]): r.get("tok_s") for r in rows}
    for r in rows:
        if r["impl"].startswith("fastinfer") and r.get("tok_s"):
            for key, peer in (("vs_hf_eager", "HF eager"), ("vs_hf_compile", "HF static+compile")):
                if hf_rates.get((peer, r["batch"])):
                    r[key] = r["tok_s"] / hf_rates[(peer, r["batch"])]

    title = (f"{'tiny 2-layer' if args.tiny else 'Llama-3-8B-shaped'} decode, prompt {args.prompt_len}, "
             f"{args.steps} timed steps ({args.mode} mode)")
    print(common.markdown_table(COLUMNS, rows))
    if offline:
        print(common.markdown_table(OFFLINE_COLUMNS, offline))
    out = Path(args.out) if args.out else common.default_out("e2e")
    out.parent.mkdir(parents=True, exist_ok=True)
    chart = out.with_suffix(".png")
    problem = write_chart(chart, rows, roofline, title)
    notes.append(problem or f"chart: {chart.name}")
    if copy:
        notes.insert(0, f"device-to-device copy {copy['gbps']:.0f} GB/s (read + write), the roofline's bandwidth")
    notes += [f"offline: {o['impl']}: {o['requests']} requests, {o['seconds']:.1f} s, {o['req_s']:.2f} req/s, "
              f"{o['out_tok_s']:.0f} output tok/s, {o['total_tok_s']:.0f} total tok/s, TTFT p50 {o['ttft_ms_median']:.0f} "
              f"ms / p90 {o['ttft_ms_p90']:.0f} ms, TPOT p50 {o['tpot_ms_median']:.1f} ms / p90 {o['tpot_ms_p90']:.1f} ms"
              for o in offline]
    for impl, prof in profiles.items():
        if not prof.get("kernels_per_step"):
            notes.append(f"profile {impl}: the profiler saw no kernels of the graph replays")
            continue
        notes.append(f"profile {impl}, batch 1: {prof['kernels_per_step']:.0f} kernels per step, "
                     f"{prof['kernel_us_per_step']:.0f} us of kernels in a {prof['span_us_per_step']:.0f} us GPU span "
                     f"({prof['busy']:.0%} busy"
                     + (f"; gaps between kernels: median {prof['gap_us_median']:.2f} us, mean {prof['gap_us_mean']:.2f} us, "
                        f"{prof['overlapped']:.0%} "
                        f"overlapping the previous kernel" if prof.get("gap_us_mean") is not None else "")
                     + "); most time: " + ", ".join(
                         f"{t['kernel']} {t['us_per_step']:.0f} us ({t['per_step']:.0f}x)" for t in prof["top"][:6]))
        print(notes[-1])
    notes += [f"ERROR {e}" for e in errors]
    extra = {"copy": copy, "errors": errors, "offline": offline, "offline_columns": [list(c) for c in OFFLINE_COLUMNS],
             "profiles": profiles,
             "mode": args.mode, "chart": chart.name if problem is None else None,
             "roofline": {q: {str(b): v for b, v in curve.items()} for q, curve in roofline.items()}}
    if device.type == "cuda":
        common.write_fragment(out, name="e2e", title=title, columns=COLUMNS, rows=rows, notes=notes, extra=extra)
    else:
        import json
        out.write_text(json.dumps({"name": "e2e", "title": title, "device": {"name": "cpu"}, "notes": notes,
                                   "columns": [list(c) for c in COLUMNS], "rows": rows, **extra}, indent=1) + "\n")
    print(f"wrote {out}")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
