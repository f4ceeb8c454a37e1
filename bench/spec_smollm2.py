"""Speculative decoding on the real default model (SmolLM2-135M, GGUF), on whatever device runs it.

A summarisation-style prompt (a passage of Pride and Prejudice, then "Summary:") invites the model
to copy phrases, which n-gram prompt lookup proposes. Reports decode tokens/s without and with
speculation (same greedy output is checked), mean acceptance length and acceptance rate.
Not part of gpu_check.sh: the GPU machine has no `gguf` package to read the model.
    python bench/spec_smollm2.py [--max-tokens 96] [--out bench/results/DATE-cpu-spec-smollm2.md]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from common import markdown_table, today  # noqa: E402
from text_data import novel  # noqa: E402

from fastinfer import LLM, SamplingParams  # noqa: E402
from fastinfer.loader.gguf import default_model_path  # noqa: E402


def prompt(tokenizer) -> list[int]:
    passage = novel("prideprejudice").split("Chapter 1", 1)[1][:1500]
    messages = [{"role": "user", "content": f"Summarize this passage, quoting its key sentences:\n\n{passage}"}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]


def run(path, ids, max_tokens, speculative=None) -> dict:
    llm = LLM(str(path), kv_cache_memory_bytes=256 << 20, speculative=speculative)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate([ids[:32]], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)  # warm-up
    start = time.perf_counter()
    out = llm.generate([ids], params, use_tqdm=False)[0].outputs[0]
    elapsed = time.perf_counter() - start
    stats = llm.speculative_stats
    name = "none" if speculative is None else (f"{speculative['method']} k={speculative['num_tokens']} "
                                                f"n>={speculative.get('prompt_lookup_min', 1)}")
    return {"speculation": name, "tokens": len(out.token_ids), "seconds": elapsed,
            "tok_per_s": len(out.token_ids) / elapsed,
            "mean_acceptance_length": stats.mean_acceptance_length if speculative else None,
            "acceptance_rate": stats.acceptance_rate if speculative else None, "token_ids": out.token_ids}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / f"{today()}-cpu-spec-smollm2.md")
    args = parser.parse_args()
    path = default_model_path()
    from fastinfer.generate import get_loaded
    ids = prompt(get_loaded(str(path)).tokenizer)
    rows = [run(path, ids, args.max_tokens)]
    for k, n_min in ((3, 1), (5, 1), (5, 3)):
        rows.append(run(path, ids, args.max_tokens, {"method": "ngram", "num_tokens": k, "prompt_lookup_min": n_min,
                                                     "prompt_lookup_max": 4}))
    for r in rows[1:]:
        r["same_output"] = r["token_ids"] == rows[0]["token_ids"]
        r["speedup"] = r["tok_per_s"] / rows[0]["tok_per_s"]
    cols = [("speculation", "speculation", ""), ("tokens", "tokens", "d"), ("tok_per_s", "tokens/s", ".1f"),
            ("speedup", "vs none", ".2f"), ("mean_acceptance_length", "mean acceptance length", ".2f"),
            ("acceptance_rate", "acceptance rate", ".2f"), ("same_output", "same greedy output", "")]
    header = (f"# Speculative decoding, SmolLM2-135M-Instruct (GGUF, fp32), {today()}\n\n"
              f"Device: CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
              f"torch {torch.__version__}. Prompt: {len(ids)} tokens (chat template, a Pride and Prejudice "
              f"passage to summarise); greedy, {args.max_tokens} new tokens, one request. Load average "
              f"during the run: {os.getloadavg()[0]:.1f} (timings on a shared machine are noisy). On a CPU "
              f"the target's cost grows with every scored token, so speculation is not expected to win "
              f"here; it pays where decode is bandwidth-bound (GPU).\n\n")
    table = markdown_table(cols, rows)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(header + table + "\n")
    args.out.with_suffix(".json").write_text(json.dumps([{k: v for k, v in r.items() if k != "token_ids"}
                                                         for r in rows], indent=1) + "\n")
    return 0 if all(r.get("same_output", True) for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
