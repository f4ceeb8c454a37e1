"""Merge one GPU check's outputs into report.json and report.md (run by bench/gpu_check.sh).

    python bench/report.py --out DIR [--commit C] [--date YYYY-MM-DD] [--results-dir bench/results]
    python bench/report.py --ptxas BUILD_LOG      # only the per-kernel ptxas table; exit 1 on spills
    python bench/report.py --save DIR --results-dir bench/results   # file a finished report (as is)

Reads from DIR: steps.tsv (step, rc, seconds, note per line), build.log (ptxas -v output),
fastinfer_env.json, tests.json (bench/run_tests.py; else pytest.xml, junit) and bench/*.json (fragments of bench/common.py).
Exit status: 0 when the build, the spill check, the env check and the tests passed, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import common
import ab
import targets

# ---- ptxas -v ------------------------------------------------------------------------------------
# ptxas info    : Compiling entry function '_ZN...' for 'sm_90a'
# ptxas info    : Function properties for _ZN...
#     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
# ptxas info    : Used 22 registers, used 1 barriers, 128 bytes smem, 400 bytes cmem[0]
_ENTRY = re.compile(r"ptxas info\s*: Compiling entry function '([^']+)' for '(\w+)'")
_PROPS = re.compile(r"ptxas info\s*: Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"ptxas info\s*: Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")
_BARRIERS = re.compile(r"used (\d+) barriers")


def parse_ptxas(text: str) -> list[dict]:
    """One record per (function, arch): registers, stack, spills, smem. Kernels carry entry=True;
    non-inlined device functions appear with their stack and spills only."""
    records: dict[tuple[str, str], dict] = {}
    entry = arch = props_for = None

    def record(name: str) -> dict:
        return records.setdefault((name, arch or "?"), {
            "function": name, "arch": arch or "?", "entry": False, "registers": None, "barriers": None,
            "smem": 0, "stack": 0, "spill_stores": 0, "spill_loads": 0})

    for line in text.splitlines():
        if m := _ENTRY.search(line):
            entry, arch = m.group(1), m.group(2)
            record(entry)["entry"] = True
        elif m := _PROPS.search(line):
            props_for = m.group(1)
        elif (m := _FRAME.search(line)) and props_for:
            r = record(props_for)  # the same kernel compiled in two units: keep the worst figures
            r["stack"], r["spill_stores"], r["spill_loads"] = (
                max(r["stack"], int(m.group(1))), max(r["spill_stores"], int(m.group(2))),
                max(r["spill_loads"], int(m.group(3))))
            props_for = None
        elif (m := _USED.search(line)) and entry:
            r = record(entry)
            r["registers"] = max(r["registers"] or 0, int(m.group(1)))
            if s := _SMEM.search(line):
                r["smem"] = max(r["smem"], int(s.group(1)))
            if b := _BARRIERS.search(line):
                r["barriers"] = int(b.group(1))
    out = list(records.values())
    for r, name in zip(out, demangle([r["function"] for r in out])):
        r["name"] = name
    return sorted(out, key=lambda r: (not r["entry"], r["name"], r["arch"]))


def demangle(names: list[str]) -> list[str]:
    """Readable short names ('rmsnorm::rms_norm_kernel<__nv_bfloat16, true>'); mangled if no c++filt."""
    tool = shutil.which("c++filt") or shutil.which("cu++filt")
    if not tool or not names:
        return list(names)
    try:
        lines = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True,
                               timeout=30, check=True).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return list(names)
    return [_short(d) for d in lines] if len(lines) == len(names) else list(names)


def _short(demangled: str) -> str:
    """Drop the return type, the parameter list and the namespace 'fastinfer::'."""
    name = demangled.removeprefix("void ")
    if name.endswith(")"):
        depth = 0
        for i in range(len(name) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(name[i], 0)
            if depth == 0:
                name = name[:i]
                break
    return name.replace("fastinfer::", "")


def spill_summary(kernels: list[dict], build_ok: bool) -> dict:
    spilling = [k["name"] for k in kernels if k["spill_stores"] or k["spill_loads"]]
    problems = [f"spills in {n}" for n in spilling]
    if build_ok and not any(k["entry"] for k in kernels):
        problems.append("no ptxas report in the build log (was FASTINFER_PTXAS_VERBOSE=ON and were the .cu files rebuilt?)")
    return {"ok": build_ok and not problems, "spilling": spilling, "problems": problems,
            "max_registers": max((k["registers"] or 0 for k in kernels), default=None)}


# ---- pytest junit xml ----------------------------------------------------------------------------

def parse_junit(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        return {"error": f"unreadable junit xml: {exc}"}
    counts = Counter(passed=0, failed=0, errors=0, skipped=0)
    failures, skip_reasons = [], Counter()
    for case in root.iter("testcase"):
        test = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None:
            counts["failed"] += 1
            failures.append(test)
        elif case.find("error") is not None:
            counts["errors"] += 1
            failures.append(test + " (error)")
        elif (skip := case.find("skipped")) is not None:
            counts["skipped"] += 1
            skip_reasons[(skip.get("message") or "").removeprefix("Skipped: ")[:120]] += 1
        else:
            counts["passed"] += 1
    return {**counts, "failures": failures, "skip_reasons": dict(skip_reasons.most_common())}


# ---- gather -------------------------------------------------------------------------------------

def read_steps(path: Path) -> dict:
    steps = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            name, rc, seconds, *note = line.split("\t") + [""]
            steps[name] = {"rc": int(rc) if rc.lstrip("-").isdigit() else rc,
                           "seconds": int(seconds) if seconds.isdigit() else None, "note": note[0]}
    return steps


def card_info() -> dict:
    info = {"name": "no GPU", "driver": None}
    try:
        import torch
        info.update(torch=torch.__version__, cuda=torch.version.cuda)
        if torch.cuda.is_available():
            info.update({k: v for k, v in common.device_info().items() if k not in ("torch", "cuda")})
    except ImportError:
        pass
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        info["driver"] = smi.stdout.split("\n")[0].strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3'."""
    name = re.sub(r"^nvidia\s+", "", name.strip(), flags=re.I)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def _ok(step: dict | None, passing=(0,)) -> bool | None:
    """True / False, or None when the step was skipped (an earlier step failed)."""
    if step is not None and step["rc"] == "skip":
        return None
    return step is not None and step["rc"] in passing


def build_report(out: Path, commit: str, date: str) -> dict:
    steps = read_steps(out / "steps.tsv")
    build_log = out / "build.log"
    kernels = parse_ptxas(build_log.read_text(errors="replace")) if build_log.is_file() else []
    build_ok = _ok(steps.get("build"))
    env_path = out / "fastinfer_env.json"
    tests_json = out / "tests.json"  # bench/run_tests.py; a plain pytest run leaves only pytest.xml
    tests = json.loads(tests_json.read_text()) if tests_json.is_file() else parse_junit(out / "pytest.xml")
    # pytest exit 5: no test was selected by -m cuda: reported, not a failure
    tests_ok = _ok(steps.get("pytest"), passing=(0, 5))
    if tests_ok and tests and tests.get("failures"):
        tests_ok = False
    benchmarks = {}
    for frag in sorted((out / "bench").glob("*.json")):
        try:
            benchmarks[frag.stem] = json.loads(frag.read_text())
        except json.JSONDecodeError as exc:
            benchmarks[frag.stem] = {"error": f"unreadable: {exc}"}
    checks = {"build": build_ok, "spills": spill_summary(kernels, build_ok)["ok"] if build_ok else None,
              "env": _ok(steps.get("env")), "tests": tests_ok}
    # compute-sanitizer (gpu_check.sh GPU_CHECK_SANITIZE): judged only where a tool ran to the end; exit
    # 86 = it reported errors, another nonzero exit = a test under it failed. A run cut by the time
    # limit or skipped says nothing either way.
    sanitized = [s for name, s in steps.items() if name.startswith("sanitize:") and s["rc"] not in ("skip", 124, 137)]
    if sanitized:
        checks["sanitizer"] = all(s["rc"] == 0 for s in sanitized)
    card = card_info()
    return {
        "date": date, "commit": commit, "card": card, "card_slug": slug(card["name"]),
        "ok": all(v is True for v in checks.values()), "checks": checks, "steps": steps,
        "build": {"kernels": kernels, **spill_summary(kernels, build_ok)},
        "fastinfer_env": json.loads(env_path.read_text()) if env_path.is_file() else None,
        "tests": tests, "benchmarks": benchmarks, "targets": targets.evaluate(benchmarks),
        "ab": ab.compare(benchmarks),
    }


# ---- render -------------------------------------------------------------------------------------

KERNEL_COLUMNS = [("name", "kernel", ""), ("arch", "arch", ""), ("registers", "registers", "d"),
                  ("stack", "stack B", "d"), ("spill_stores", "spill stores B", "d"),
                  ("spill_loads", "spill loads B", "d"), ("smem", "static smem B", "d")]
TARGET_COLUMNS = [("issue", "issue", "d"), ("target", "target", ""), ("bar", "bar", ""), ("measured", "measured", ""),
                  ("verdict", "verdict", "")]
STEP_COLUMNS = [("step", "step", ""), ("result", "result", ""), ("seconds", "seconds", "d"), ("note", "note", "")]


def _step_result(step: str, rc) -> str:
    if step.startswith("bench:") and rc == common.EXIT_CANNOT_RUN:
        return "cannot run (exit 2)"
    return {0: "ok", 124: "TIMEOUT", 137: "KILLED"}.get(rc, rc if isinstance(rc, str) else f"FAIL (exit {rc})")


def render_markdown(report: dict) -> str:
    card, checks = report["card"], report["checks"]
    failed = [name for name, ok in checks.items() if ok is False]
    not_run = [name for name, ok in checks.items() if ok is None]
    verdict = "PASS" if report["ok"] else "FAIL: " + ", ".join(failed) + (
        f" ({', '.join(not_run)} not run)" if not_run else "")
    gpu = card["name"] + (f" ({card['capability']}, {card['sms']} SMs, {card['memory_gib']} GiB)" if "sms" in card else "")
    lines = [f"# fastinfer GPU check: {card['name']}, {report['date']}", "",
             "| | |", "|---|---|",
             f"| result | {verdict} |",
             f"| card | {gpu}, driver {card.get('driver') or '?'} |",
             f"| torch | {card.get('torch', '?')} (CUDA {card.get('cuda') or 'none'}) |",
             f"| commit | {report['commit']} |", f"| date | {report['date']} |", "",
             "## Issue targets (from this run's benchmarks; bench/targets.py)", ""]
    lines.append(common.markdown_table(TARGET_COLUMNS, report.get("targets") or []))
    if report.get("ab"):
        lines += ["", "## Settings A/B (variant speed / baseline speed per shape, same run; bench/ab.py)", "",
                  "A \"new default\" row compares the default with its earlier form (revert it if it loses); a "
                  "\"switch\" row compares a candidate setting with the default (flip it if it wins).", ""]
        lines.append(common.markdown_table(ab.COLUMNS, report["ab"]))
    lines += ["", "## Steps", ""]
    lines.append(common.markdown_table(STEP_COLUMNS, [
        {"step": name, "result": _step_result(name, s["rc"]), "seconds": s["seconds"], "note": s["note"]}
        for name, s in report["steps"].items()]))
    build = report["build"]
    lines += ["", "## Build: ptxas resource usage", ""]
    lines.append(f"{sum(k['entry'] for k in build['kernels'])} kernels, max {build['max_registers']} registers; "
                 + ("no spills." if not build["spilling"] and build["ok"] else "PROBLEMS: " + "; ".join(build["problems"] or ["build failed"])))
    if build["kernels"]:
        lines += ["", common.markdown_table(KERNEL_COLUMNS, build["kernels"])]
    lines += ["", "## Tests (pytest -m cuda)", ""]
    tests = report["tests"]
    if tests is None:
        lines.append("not run (see steps)")
    elif "error" in tests:
        lines.append(tests["error"])
    else:
        lines.append(f"passed {tests['passed']}, failed {tests['failed']}, errors {tests['errors']}, "
                     + (f"crashed {tests['crashed']}, " if tests.get("crashed") else "")
                     + f"skipped {tests['skipped']}"
                     + (f"; {len(tests['runs'])} pytest runs (exit {[r['rc'] for r in tests['runs']]})"
                        if len(tests.get("runs", [])) > 1 else ""))
        lines += [f"- FAILED {t}" for t in tests["failures"]]
        lines += [f"- skipped x{n}: {why}" for why, n in tests["skip_reasons"].items()]
    lines += ["", "## Benchmarks"]
    for name, frag in report["benchmarks"].items():
        lines += ["", f"### {frag.get('title', name)}", ""]
        if "error" in frag and "rows" not in frag:
            lines.append(frag["error"])
            continue
        lines += [f"{note}  " for note in frag.get("notes", [])]
        lines += ["", common.markdown_table(frag["columns"], frag["rows"])]
    if not report["benchmarks"]:
        lines += ["", "none ran"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="the folder gpu_check.sh wrote into")
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--date", default=common.today())
    parser.add_argument("--results-dir", type=Path, help="also copy the report to DIR/<date>-<card>.{json,md}")
    parser.add_argument("--ptxas", type=Path, help="only parse this build log and print its kernel table")
    parser.add_argument("--save", type=Path, help="only copy DIR/report.{json,md}, made on the GPU machine, "
                                                  "to --results-dir/<date>-<card>.{json,md}")
    args = parser.parse_args(argv)
    if args.ptxas:
        kernels = parse_ptxas(args.ptxas.read_text(errors="replace"))
        summary = spill_summary(kernels, build_ok=True)
        print(common.markdown_table(KERNEL_COLUMNS, kernels))
        print("no spills" if summary["ok"] else "PROBLEMS: " + "; ".join(summary["problems"]))
        return 0 if summary["ok"] else 1
    if args.save:
        if args.results_dir is None:
            parser.error("--save needs --results-dir")
        save_copy(args.save, args.results_dir)
        return 0
    if args.out is None:
        parser.error("--out (or --ptxas, or --save) is required")
    report = build_report(args.out, args.commit, args.date)
    (args.out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "report.md").write_text(render_markdown(report))
    if args.results_dir:
        save_copy(args.out, args.results_dir)
    return 0 if report["ok"] else 1


def save_copy(src: Path, results_dir: Path) -> None:
    """src/report.{json,md} -> results_dir/<date>-<card slug>.{json,md}, names read from the report."""
    report = json.loads((src / "report.json").read_text())
    stem = results_dir / f"{report['date']}-{report['card_slug']}"
    results_dir.mkdir(parents=True, exist_ok=True)
    for suffix in (".json", ".md"):
        shutil.copyfile(src / f"report{suffix}", stem.with_suffix(suffix))
    print(f"report copied to {stem}.json and {stem}.md")


if __name__ == "__main__":
    raise SystemExit(main())
