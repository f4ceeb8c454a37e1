"""Command line: `python -m fastinfer env` and `python -m fastinfer generate PROMPT`."""
from __future__ import annotations

import argparse
import sys


def _generate(args) -> int:
    import torch

    from .generate import generate, get_loaded
    from .loader.gguf import default_model_path

    loaded = get_loaded(args.model or default_model_path(), args.dtype, args.device, args.quantization)
    tok = loaded.tokenizer
    if tok is None:
        print(f"error: no tokenizer found with {args.model}", file=sys.stderr)
        return 2
    if args.chat:
        ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tok(args.prompt, return_tensors="pt")["input_ids"]
    streamer = None
    if not args.no_stream:
        from transformers import TextStreamer
        streamer = TextStreamer(tok, skip_prompt=args.chat, skip_special_tokens=True)  # as --no-stream prints
    kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0)
    if args.temperature > 0:
        kwargs.update(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
        torch.manual_seed(args.seed)
    out = generate(loaded, ids, streamer=streamer, **kwargs)
    if streamer is None:
        start = ids.shape[1] if args.chat else 0
        print(tok.decode(out[0, start:], skip_special_tokens=True))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastinfer", description="fastinfer command line")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("env", help="versions, build and op report")
    g = sub.add_parser("generate", help="generate text (default model: SmolLM2-135M-Instruct)")
    g.add_argument("prompt")
    g.add_argument("--model", help="checkpoint directory or .gguf file (default: SmolLM2-135M-Instruct GGUF)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: fp32 on CPU, bf16 on GPU)")
    g.add_argument("--device", default=None, help="cpu | cuda (default: the GPU when all ops have CUDA kernels)")
    g.add_argument("--quantization", default=None, choices=["int4", "gptq", "awq", "gguf", "fp8"],
                   help="4-bit projections (gguf: a .gguf file's Q4_0 / Q4_1 weights run natively) or fp8")
    g.add_argument("--no-stream", action="store_true", help="print the text at the end instead of streaming")
    args = parser.parse_args(argv)
    if args.command == "generate":  # checked whether or not they take effect (greedy ignores them)
        bad = ((not args.temperature >= 0 and f"--temperature (temperature) must be >= 0, got {args.temperature}")
               or (not 0 < args.top_p <= 1 and f"--top-p (top_p) must be in (0, 1], got {args.top_p}")
               or (args.top_k < 0 and f"--top-k (top_k) must be >= 0, got {args.top_k}"))
        if bad:
            print(f"error: {bad}", file=sys.stderr)
            return 2
    if args.command == "env":
        from .env import env
        print(env())
        return 0
    try:
        return _generate(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
