"""Paged decode attention over an FP8 (e4m3) KV cache against the same kernel over a bf16 cache.

    python bench/bench_fp8_kv.py [--out PATH] [--iters N] [--batch 8 32 64] [--context 8192]

Llama-3-8B attention shape: 32 query heads on 8 KV heads, head_dim 128, block_size 16, every
sequence at `--context` tokens, blocks in a shuffled order (a paged cache, not a contiguous one).
The same random K/V are stored once as bf16 and once as e4m3 (x / scale, per-layer scales
k 0.05 / v 0.02); the query is bf16 in both. Decode reads the whole cache once per step, so it is
bound by the KV bytes: "of copy BW" is those bytes over the time, as a fraction of the
device-to-device copy bandwidth measured in the run. "fp8 speedup" is bf16 time / fp8 time (issue 7:
at least 1.6x at 8k contexts). "max |fp8 - bf16|" compares the two outputs (information only: the
e4m3 rounding of K and V is the difference). Both decode kernels run (FASTINFER_DECODE_KERNEL):
the default tensor-core one, then the CUDA-core one for comparison; then the tensor-core kernel again
with the split heuristic's CTAs-per-SM target swept (FASTINFER_DECODE_CTAS_PER_SM, --ctas-per-sm; its
default is 6), to pick each cache dtype's target. Timing and L2 flushing: bench/common.py.
"""
from __future__ import annotations

import os

import torch

import common

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
KV_SCALE = (0.05, 0.02)
FP8 = torch.float8_e4m3fn
KERNELS = ("tensor_cores", "cuda_cores")


def make_inputs(batch: int, context: int, seed: int = 0) -> dict:
    g = torch.Generator(device="cuda").manual_seed(seed)
    blocks_per_seq = -(-context // BLOCK_SIZE)
    num_blocks = batch * blocks_per_seq
    kv_bf16 = torch.randn(num_blocks, 2, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, generator=g, device="cuda",
                          dtype=torch.bfloat16)
    kv_scale = torch.tensor(KV_SCALE, dtype=torch.float32, device="cuda")
    kv_fp8 = (kv_bf16.float() / kv_scale.reshape(1, 2, 1, 1, 1)).clamp(-448.0, 448.0).to(FP8)
    kv_bf16 = (kv_fp8.float() * kv_scale.reshape(1, 2, 1, 1, 1)).to(torch.bfloat16)  # the same values, stored wide
    perm = torch.randperm(num_blocks, generator=g, device="cuda").to(torch.int32)
    return {"query": torch.randn(batch, NUM_HEADS, HEAD_DIM, generator=g, device="cuda", dtype=torch.bfloat16),
            "kv_bf16": kv_bf16, "kv_fp8": kv_fp8, "kv_scale": kv_scale,
            "block_tables": perm.reshape(batch, blocks_per_seq),
            "seq_lens": torch.full((batch,), context, dtype=torch.int32, device="cuda")}


def run_case(ops, batch: int, context: int, kernel: str, args, flush, copy_gbps: float, ctas_per_sm: str = "auto",
             d: dict | None = None) -> dict:
    os.environ["FASTINFER_DECODE_KERNEL"] = kernel  # read by the op at each call
    os.environ["FASTINFER_DECODE_CTAS_PER_SM"] = ctas_per_sm
    d = d if d is not None else make_inputs(batch, context)
    scale = HEAD_DIM ** -0.5
    out_bf16, out_fp8 = torch.empty_like(d["query"]), torch.empty_like(d["query"])

    def bf16():
        ops.paged_decode_attention(d["query"], d["kv_bf16"], d["block_tables"], d["seq_lens"], scale, out=out_bf16,
                                   check_indices=False)

    def fp8():
        ops.paged_decode_attention(d["query"], d["kv_fp8"], d["block_tables"], d["seq_lens"], scale, out=out_fp8,
                                   check_indices=False, kv_scale=d["kv_scale"])

    t_bf16 = common.time_cuda(bf16, warmup=args.warmup, iters=args.iters, flush=flush)
    t_fp8 = common.time_cuda(fp8, warmup=args.warmup, iters=args.iters, flush=flush)
    kv_elems = batch * context * NUM_KV_HEADS * HEAD_DIM * 2  # K and V
    row = {"kernel": kernel.replace("_", " ") + ("" if ctas_per_sm == "auto" else f", {ctas_per_sm} CTAs/SM"), "batch": batch, "context": context, "bf16_us": t_bf16["us"], "fp8_us": t_fp8["us"],
           "speedup": t_bf16["us"] / t_fp8["us"],
           "bf16_frac": common.gbps(2 * kv_elems, t_bf16["us"]) / copy_gbps,
           "fp8_frac": common.gbps(kv_elems, t_fp8["us"]) / copy_gbps,
           "max_diff": (out_fp8.float() - out_bf16.float()).abs().max().item()}
    print(f"{row['kernel']} B{batch} ctx {context}: bf16 {row['bf16_us']:.1f} us, fp8 {row['fp8_us']:.1f} us, "
          f"{row['speedup']:.2f}x")
    return row


COLUMNS = [("kernel", "decode kernel", ""), ("batch", "batch", ""), ("context", "context", ""), ("bf16_us", "bf16 KV us", ".1f"),
           ("fp8_us", "fp8 KV us", ".1f"), ("speedup", "fp8 speedup", ".2f"),
           ("bf16_frac", "bf16 of copy BW", ".0%"), ("fp8_frac", "fp8 of copy BW", ".0%"),
           ("max_diff", "max |fp8 - bf16|", ".2e")]


def main(argv: list[str] | None = None) -> int:
    parser = common.parser("fp8_kv", __doc__, iters=20, warmup=3)
    parser.add_argument("--batch", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--ctas-per-sm", nargs="*", default=["2", "3", "4", "8", "12"],
                        help="FASTINFER_DECODE_CTAS_PER_SM values swept for the tensor-core kernel (auto = 6 runs above)")
    args = parser.parse_args(argv)
    fastinfer, flush, copy = common.start()
    rows, errors = [], []
    for kernel in KERNELS:
        for batch in args.batch:
            try:
                rows.append(run_case(fastinfer.ops, batch, args.context, kernel, args, flush, copy["gbps"]))
            except Exception as exc:  # report and carry on
                errors.append(f"{kernel} B{batch}: {type(exc).__name__}: {exc}")
                print(f"ERROR {errors[-1]}")
            torch.cuda.empty_cache()
    # The split heuristic's target swept for the tensor-core kernel (PERF_NOTES: bf16 wanted more, shorter
    # CTAs, e4m3 fewer), both caches, to choose each one's default from one run.
    for batch in args.batch:
        d = make_inputs(batch, args.context)
        for target in args.ctas_per_sm:
            try:
                rows.append(run_case(fastinfer.ops, batch, args.context, "tensor_cores", args, flush, copy["gbps"],
                                     ctas_per_sm=target, d=d))
            except Exception as exc:
                errors.append(f"tensor_cores B{batch} {target} CTAs/SM: {type(exc).__name__}: {exc}")
                print(f"ERROR {errors[-1]}")
        del d
        torch.cuda.empty_cache()
    os.environ.pop("FASTINFER_DECODE_KERNEL", None)
    os.environ.pop("FASTINFER_DECODE_CTAS_PER_SM", None)
    notes = [f"{NUM_HEADS}/{NUM_KV_HEADS} heads, head_dim {HEAD_DIM}, block_size {BLOCK_SIZE}, bf16 query; "
             f"L2 flushed before each of {args.iters} calls; copy {copy['gbps']:.0f} GB/s",
             "target (issue 7): fp8 speedup >= 1.6x at context 8192"]
    return common.finish(args.out, name="fp8_kv", title="Decode attention: FP8 vs bf16 KV cache",
                         columns=COLUMNS, rows=rows, notes=notes, errors=errors, copy=copy)


if __name__ == "__main__":
    raise SystemExit(main())
