"""One mixture-of-experts MLP (models/moe.py) in decode steps: the moe_gemv path against the per-expert path, bf16.

    python bench/bench_moe.py [--out PATH] [--iters N] [--tokens 1 4 16]

Shapes: Mixtral-8x7B (8 experts, top 2, hidden 4096, expert FFN 14336) and Qwen3-30B-A3B (128 experts,
top 8, hidden 2048, expert FFN 768). Rows: "moe_gemv" (the decode path: two ops.moe_gemv launches, expert
ids on the device, graph-safe), "per-expert GEMMs" (FASTINFER_MOE_GEMV=0: the pairs grouped by expert, a
host read-back of the group sizes, a cuBLAS GEMM per expert hit), and "moe_gemv, CUDA graph" (the decode
path replayed from a graph, as decode steps run) and "grouped_mm (HF's path)" (torch._grouped_mm over the
pairs sorted by expert: what prefill and steps past the moe_gemv limit run in bf16 on sm_90). Router and
combine are included in every row. 4-bit experts (round-to-nearest layout, group 128, zero points; random
codes): "int4 moe_int4_linear" (their decode path: ops.moe_int4_linear for gate / up and for down, SwiGLU
between, graph-safe), the same from a CUDA graph, and "int4 per-expert int4_linear" (FASTINFER_MOE_GEMV=0: a
host read-back and an int4_linear per expert hit); their bytes count 4 bits a weight plus the group scales
and zero points. FP8 experts (e4m3, per-row scales): "fp8 moe_gemv (W8A16)" (their decode path: moe_gemv on the
e4m3 weights, graph-safe), its CUDA graph, and "fp8 per-expert fp8_linear" (FASTINFER_MOE_GEMV=0: W8A8 per
expert hit); 1 byte a weight. "vs per-expert" compares each quantized row with its own per-expert row. Bytes: the
weights of the distinct experts the step's routing selects (3 H F x 2 bytes each) plus the router; GB/s =
those bytes / median time, and that as a fraction of the device-to-device copy bandwidth measured in the
same run. "vs per-expert" = the per-expert path's time / this time. Timing and L2 flushing: bench/common.py.
"""
from __future__ import annotations

import torch

import common

SHAPES = {"mixtral-8x7b": (8, 2, 4096, 14336), "qwen3-30b-a3b": (128, 8, 2048, 768)}  # (E, top_k, H, F)
TOKENS = (1, 4, 16)
DTYPE = torch.bfloat16
GEMV, EXPERT, GRAPH, GROUPED = "moe_gemv", "per-expert GEMMs", "moe_gemv, CUDA graph", "grouped_mm (HF's path)"
INT4_GROUP = 128
# the quantized experts' rows: (fused path, the same from a CUDA graph, per-expert path, bytes per weight)
QUANTIZED = {"int4": ("int4 moe_int4_linear", "int4 moe_int4_linear, CUDA graph", "int4 per-expert int4_linear",
                      0.5 + 2 * 2 / INT4_GROUP),
             "fp8": ("fp8 moe_gemv (W8A16)", "fp8 moe_gemv (W8A16), CUDA graph", "fp8 per-expert fp8_linear", 1.0)}


def forced(moe, gemv: bool, grouped: bool):
    """moe(x, decode=True) with models/moe.py's path choice fixed for the call."""
    from fastinfer.models import moe as moe_mod

    def run(x):
        saved = moe_mod.use_moe_gemv, moe_mod.grouped_mm_ok
        moe_mod.use_moe_gemv = lambda device, pairs, dtype: gemv
        moe_mod.grouped_mm_ok = lambda hidden: grouped
        try:
            return moe(x, decode=True)
        finally:
            moe_mod.use_moe_gemv, moe_mod.grouped_mm_ok = saved
    return run


def make_moe(experts: int, top_k: int, hidden: int, ffn: int, g: torch.Generator, kind: str | None = None):
    from fastinfer.config import ModelConfig
    from fastinfer.models.moe import MoE
    from fastinfer.quant.linear import QuantConfig
    cfg = ModelConfig(architecture="MixtralForCausalLM", vocab_size=32, hidden_size=hidden, intermediate_size=ffn,
                      num_layers=1, num_heads=1, num_kv_heads=1, head_dim=64, rms_norm_eps=1e-5, rope_theta=1e4,
                      rope_scaling=None, max_position_embeddings=64, tie_word_embeddings=False, attention_bias=False,
                      moe_layers=(0,), num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=ffn)
    moe = MoE(cfg, DTYPE, torch.device("cuda"), QuantConfig("int4", INT4_GROUP, "zeros") if kind == "int4" else kind)
    moe.router.copy_((torch.randn(moe.router.shape, generator=g, device="cuda") * hidden ** -0.5).to(DTYPE))
    if kind != "int4":
        for t in (moe.gate_up, moe.down):
            w = torch.randn(t.shape, generator=g, device="cuda") * t.shape[-1] ** -0.5
            t.copy_(w.to(DTYPE) if kind is None else (w * 448 * t.shape[-1] ** 0.5 / 4).clamp(-448, 448).to(t.dtype))
        if kind == "fp8":  # e4m3 codes of about +-112, scales bringing rows back to ~1 / sqrt(K)
            moe.gate_up_scale.fill_(4 / (448 * hidden ** 0.5))
            moe.down_scale.fill_(4 / (448 * ffn ** 0.5))
        return moe
    for (qweight, scales, zeros, _), k in ((moe.int4_gate_up, hidden), (moe.int4_down, ffn)):
        qweight.copy_(torch.randint(-2 ** 31, 2 ** 31 - 1, qweight.shape, generator=g, device="cuda", dtype=torch.int32))
        scales.copy_((torch.rand(scales.shape, generator=g, device="cuda") * 0.2 * k ** -0.5).to(DTYPE))
        zeros.copy_(torch.randint(0, 16, zeros.shape, generator=g, device="cuda").to(DTYPE))
    return moe


def graphed(fn, x: torch.Tensor):
    """fn(x) captured once in a CUDA graph; the returned callable replays it."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn(x)  # warm up outside the capture (lazy initialisation)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(x)
    return graph.replay


def run_shape(name: str, shape, tokens, args, flush, copy_gbps: float, errors: list) -> list[dict]:
    experts, top_k, hidden, ffn = shape
    g = torch.Generator(device="cuda").manual_seed(experts + hidden)
    moe = make_moe(experts, top_k, hidden, ffn, g)
    quantized = {kind: make_moe(experts, top_k, hidden, ffn, g, kind) for kind in QUANTIZED if kind in args.quantized}
    rows = []
    for t in tokens:
        x = torch.randn(t, hidden, generator=g, device="cuda").to(DTYPE)
        with torch.no_grad():
            ids = torch.topk(torch.softmax((x @ moe.router.t()).float(), dim=-1), top_k).indices
        distinct = int(torch.unique(ids).numel())
        nbytes = distinct * 3 * hidden * ffn * 2 + experts * hidden * 2
        sizes, bases = {}, {}  # per row: bytes read, and the per-expert row it is compared with
        impls = {GEMV: forced(moe, True, False), EXPERT: forced(moe, False, False), GROUPED: forced(moe, False, True)}
        graphs = {GRAPH: GEMV}
        for kind, qmoe in quantized.items():
            fused, graph, expert, per_weight = QUANTIZED[kind]
            qmoe.router.copy_(moe.router)  # the same routing, so the same experts hit
            impls.update({fused: forced(qmoe, True, False), expert: forced(qmoe, False, False)})
            graphs[graph] = fused
            for impl in (fused, graph, expert):
                sizes[impl] = distinct * 3 * hidden * ffn * per_weight + experts * hidden * 2
                bases[impl] = expert
        times, outputs = {}, {}
        for impl, fn in list(impls.items()) + [(graph, None) for graph in graphs]:
            try:
                if impl in graphs:
                    replay = graphed(impls[graphs[impl]], x)
                    t_us = common.time_cuda(replay, warmup=args.warmup, iters=args.iters, flush=flush)
                else:
                    outputs[impl] = fn(x).clone()
                    t_us = common.time_cuda(lambda: fn(x), warmup=args.warmup, iters=args.iters, flush=flush)
            except Exception as exc:  # report and carry on: one failure must not hide the other rows
                errors.append(f"{name} tokens={t} {impl}: {type(exc).__name__}: {exc}")
                print(f"ERROR {errors[-1]}")
                continue
            size = sizes.get(impl, nbytes)
            bw = common.gbps(size, t_us["us"])
            times[impl] = t_us["us"]
            rows.append({"shape": name, "tokens": t, "experts_hit": distinct, "impl": impl, "us": t_us["us"],
                         "bytes": size, "gbps": bw, "frac_copy": bw / copy_gbps})
        fused_rows = [GEMV] + [QUANTIZED[kind][0] for kind in quantized]
        for r in rows[-len(times):]:
            base = bases.get(r["impl"], EXPERT)
            r["vs_expert"] = times[base] / r["us"] if base in times else None
            if r["impl"] in fused_rows and base in outputs and r["impl"] in outputs:
                r["diff_vs_expert"] = float((outputs[r["impl"]].float() - outputs[base].float()).abs().max())
    return rows


COLUMNS = [("shape", "shape", ""), ("tokens", "tokens", "d"), ("experts_hit", "experts hit", "d"), ("impl", "impl", ""),
           ("us", "time (us)", ".1f"), ("gbps", "GB/s", ".0f"), ("frac_copy", "of copy BW", ".1%"),
           ("vs_expert", "vs per-expert", ".2f"), ("diff_vs_expert", "max |diff| vs per-expert", ".1e")]


def main(argv: list[str] | None = None) -> int:
    parser = common.parser("moe", __doc__, iters=30, warmup=5)
    parser.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    parser.add_argument("--quantized", nargs="*", default=list(QUANTIZED), choices=list(QUANTIZED),
                        help="quantized experts to time too (default: int4 fp8; none: --quantized)")
    args = parser.parse_args(argv)
    _, flush, copy = common.start()
    rows, errors = [], []
    for name, shape in SHAPES.items():
        rows += run_shape(name, shape, args.tokens, args, flush, copy["gbps"], errors)
        torch.cuda.empty_cache()
    notes = [f"device-to-device copy {copy['gbps']:.0f} GB/s (read + write); bf16; L2 flushed before each of "
             f"{args.iters} calls; bytes = the distinct experts' weights the routing selects + the router"]
    return common.finish(args.out, name="moe", title="MoE decode step: moe_gemv / moe_int4_linear vs per-expert GEMMs",
                         columns=COLUMNS, rows=rows, notes=notes, errors=errors, copy=copy)


if __name__ == "__main__":
    raise SystemExit(main())
