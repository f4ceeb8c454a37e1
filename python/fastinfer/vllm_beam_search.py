"""vLLM's ``LLM.beam_search`` (offline beam search over the batch API), its algorithm and output types.

Each step runs every live beam of every prompt as a one-token request asking for its 2 x beam_width top
logprobs (the prefix cache keeps the re-prefill to each beam's last partial block); every (beam,
candidate) pair becomes a new beam with cum_logprob += logprob. A candidate that is the EOS token
(unless ignore_eos) is set aside as completed; the others are ranked by
cum_logprob / len(tokens) ** length_penalty (tokens include the prompt; a final EOS is not counted) and
the best beam_width live on. After max_tokens steps the completed and the live beams are ranked the
same way and the best beam_width returned, best first. This is HF's beam scoring on vLLM's candidate
rule; it differs from fastinfer.generate(num_beams=...), which follows HF's generate.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .outputs import Logprob
from .sampling_params import SamplingParams


@dataclass
class BeamSearchParams:
    """vLLM's BeamSearchParams."""
    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        for name in ("beam_width", "max_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"BeamSearchParams.{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) or \
                not 0 <= self.temperature < float("inf"):
            raise ValueError(f"BeamSearchParams.temperature must be a number >= 0, got {self.temperature!r}")
        if isinstance(self.length_penalty, bool) or not isinstance(self.length_penalty, (int, float)) or \
                not -float("inf") < self.length_penalty < float("inf"):
            raise ValueError(f"BeamSearchParams.length_penalty must be a finite number, got {self.length_penalty!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"BeamSearchParams.ignore_eos must be True or False, got {self.ignore_eos!r}")


@dataclass
class BeamSearchSequence:
    """One beam: tokens (the prompt's, then the generated ones), per generated step the candidates'
    {token id: Logprob} it was chosen from, their cumulative log probability and, in the output, the
    decoded text of all its tokens (None without a tokenizer)."""
    tokens: list[int]
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class BeamSearchOutput:
    """The best beam_width sequences of one prompt, best first."""
    sequences: list[BeamSearchSequence]


def beam_search_score(tokens: list[int], cum_logprob: float, eos_token_id: int | None, length_penalty: float) -> float:
    length = len(tokens) - (1 if eos_token_id is not None and tokens[-1] == eos_token_id else 0)
    return cum_logprob / (length ** length_penalty)


def beam_search(llm, prompts, params: BeamSearchParams, use_tqdm: bool = False) -> list[BeamSearchOutput]:
    """LLM.beam_search: prompts as LLM.generate takes them (str, token ids, prompt dicts, or a list)."""
    if not isinstance(params, BeamSearchParams):
        raise ValueError(f"params must be a BeamSearchParams, got {type(params).__name__}")
    engine = llm.engine
    tokenizer = engine.tokenizer
    # vLLM ends a beam at the tokenizer's EOS; without a tokenizer, the model's first EOS id
    if tokenizer is not None:
        eos = getattr(tokenizer, "eos_token_id", None)
    else:
        config_eos = engine.loaded.model.config.eos_token_id
        eos = config_eos[0] if config_eos else (min(engine.eos_ids) if engine.eos_ids else None)
    prompts, _ = llm._requests(prompts, SamplingParams(max_tokens=1))
    step_params = SamplingParams(logprobs=2 * params.beam_width, max_tokens=1, temperature=params.temperature,
                                 detokenize=False)

    def score(beam: BeamSearchSequence) -> float:
        return beam_search_score(beam.tokens, beam.cum_logprob, eos, params.length_penalty)

    live = [[BeamSearchSequence(tokens=engine.tokenize(p))] for p in prompts]
    completed: list[list[BeamSearchSequence]] = [[] for _ in prompts]
    for _ in range(params.max_tokens):
        # a beam that has reached the model's length limit cannot be extended: it is finished as it is
        for i, beams in enumerate(live):
            completed[i] += [beam for beam in beams if len(beam.tokens) >= engine.max_model_len]
            live[i] = [beam for beam in beams if len(beam.tokens) < engine.max_model_len]
        batch = [(i, beam) for i, beams in enumerate(live) for beam in beams]
        if not batch:
            break
        results = llm.generate([beam.tokens for _, beam in batch], step_params, use_tqdm=use_tqdm)
        candidates: list[list[BeamSearchSequence]] = [[] for _ in prompts]
        for (i, beam), result in zip(batch, results):
            step = result.outputs[0].logprobs[0]
            for token, logprob in step.items():
                new = BeamSearchSequence(tokens=beam.tokens + [token], logprobs=beam.logprobs + [step],
                                         cum_logprob=beam.cum_logprob + float(logprob))
                (completed[i] if token == eos and not params.ignore_eos else candidates[i]).append(new)
        live = [sorted(c, key=score, reverse=True)[:params.beam_width] for c in candidates]
    outputs = []
    for i in range(len(prompts)):
        best = sorted(completed[i] + live[i], key=score, reverse=True)[:params.beam_width]
        for beam in best:
            beam.text = tokenizer.decode(beam.tokens) if tokenizer is not None else None
        outputs.append(BeamSearchOutput(sequences=best))
    return outputs
