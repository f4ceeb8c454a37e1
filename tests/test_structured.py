"""Structured outputs (fastinfer.structured): JSON schema -> regex, the token automaton against a brute
force over a small vocabulary, and the engine end to end with SmolLM2's real tokenizer on a random model
(every output matches its constraint, whatever the model would have said)."""
from __future__ import annotations

import json
import re

import pytest
import torch

import fastinfer
from fastinfer import LLM, SamplingParams, StructuredOutputsParams
from fastinfer.json_schema import json_object_regex
from fastinfer.structured import TokenGuide, Vocabulary, json_schema_regex
from models import make_hf_model, smollm2_tokenizer

pytest.importorskip("interegular")

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
    "ok": {"type": "boolean"}, "kind": {"enum": ["a", "b", 3, None]}, "when": {"type": "string", "format": "date"},
    "score": {"type": ["number", "null"]}}, "required": ["name", "age"]}


@pytest.mark.parametrize("schema, good, bad", [
    (PERSON,
     ['{"name": "bob", "age": 3}', '{"name":"bob","age":-12,"tags":["a", "bc"],"ok":true,"kind":null,'
      '"when":"2024-01-31","score":-1.5e3}', '{ "name" : "", "age" : 0 , "score" : null }',
      '{"name": "b\\"ob\\u00e9", "age": 3, "kind": 3}'],
     ['{"age": 3}', '{"name": "bob"}', '{"name": "bob", "age": 3, "zz": 1}', '{"name": "bob", "age": 03}',
      '{"age": 3, "name": "bob"}', '{"name": "bob", "age": 3,}', '{"name": "toolongname", "age": 1}',
      '{"name": "bob", "age": 3, "tags": ["a", "b", "c", "d"]}', '{"name": "bob", "age": 3, "when": "2024-13-01"}',
      '{"name":  "bob", "age": 3}']),
    ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}},  # nothing required
     ['{}', '{"a": 1}', '{"b": 2}', '{"a": 1, "b": 2}'], ['{"b": 2, "a": 1}', '{,}', '{"a": 1,}']),
    ({"type": "array", "items": {"$ref": "#/$defs/P"}, "minItems": 2, "maxItems": 3,
      "$defs": {"P": {"type": "object", "properties": {"x": {"const": "y"}}, "required": ["x"]}}},
     ['[{"x": "y"}, {"x": "y"}]', '[{"x":"y"},{"x":"y"},{"x":"y"}]'], ['[]', '[{"x": "y"}]', '[{"x": "z"}, {"x": "y"}]']),
    ({"anyOf": [{"type": "integer"}, {"type": "string", "pattern": "^[a-c]+$"}]}, ['12', '"abc"'], ['"abd"', '1.5']),
    ({"type": "string", "format": "uuid"}, ['"123e4567-e89b-12d3-a456-426614174000"'], ['"123e4567"']),
])
def test_json_schema_regex(schema, good, bad):
    pattern = json_schema_regex(schema)
    for doc in good:
        assert re.fullmatch(pattern, doc), doc
        json.loads(doc)
    for doc in bad:
        assert not re.fullmatch(pattern, doc), doc


@pytest.mark.parametrize("schema, match", [
    ({"type": "integer", "minimum": 3}, "minimum"),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": True}, "additionalProperties"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/A"}}, "$defs": {"A": {"$ref": "#/$defs/A"}}}, "recursive"),
    ({"type": "string", "format": "email"}, "format 'email'"),
    ({"properties": {"a": {"type": "integer"}}}, "without a type"),
    ({"type": "array"}, "items"),
    ({"type": "foo"}, "type 'foo'"),
])
def test_unsupported_schemas_name_the_keyword(schema, match):
    with pytest.raises(ValueError, match=match):
        StructuredOutputsParams(json=schema)


@pytest.mark.parametrize("kwargs, match", [
    (dict(), "exactly one of json, regex, choice, json_object; got none"),
    (dict(regex="a", choice=["a"]), "got regex, choice"),
    (dict(regex="a", json_object=True), "got regex, json_object"),
    (dict(json_object="yes"), "json_object must be True, False or None"),
    (dict(grammar="root ::= 'a'"), "grammar is not supported"),
    (dict(regex="(a"), "invalid regular expression"),
    (dict(choice=[]), "choice must be a non-empty list"),
    (dict(json="{not json"), "json is not valid JSON"),
])
def test_params_validation(kwargs, match):
    with pytest.raises(ValueError, match=re.escape(match) if "(" not in match else match):
        StructuredOutputsParams(**kwargs)
    with pytest.raises(ValueError, match="structured_outputs must be a fastinfer.StructuredOutputsParams"):
        SamplingParams(structured_outputs={"regex": "a"})


class _Tokenizer:
    """The three methods Vocabulary uses, over a list of token texts (id = index)."""

    def __init__(self, texts, special=()):
        self.texts, self.all_special_ids = texts, list(special)

    def get_vocab(self):
        return {t: i for i, t in enumerate(self.texts)}

    def convert_tokens_to_string(self, tokens):
        return "".join(tokens)


def test_token_guide_matches_a_brute_force():
    """From every prefix (as tokens) of every choice: the allowed tokens are exactly those whose text keeps
    the output a prefix of some choice, plus the stop tokens where the output is a whole choice."""
    texts = ["<eos>", "<pad>", "a", "b", "ab", "ba", "abc", "c", "cab", " ", " a", "aa", "bb", "x"]
    choices = ["ab", "abc a", "ba", "b", "cab c"]
    vocab = Vocabulary(_Tokenizer(texts, special=[0, 1]), len(texts) + 2)  # 2 ids past the tokenizer's
    guide = TokenGuide("|".join(re.escape(c) for c in choices), vocab, {0})
    frontier = [("", guide.initial)]
    seen = set()
    while frontier:
        prefix, state = frontier.pop()
        if prefix in seen:
            continue
        seen.add(prefix)
        allowed = set(torch.nonzero(guide.mask(state, torch.device("cpu"))).flatten().tolist())
        expected = {i for i, t in enumerate(texts) if i > 1 and any(c.startswith(prefix + t) for c in choices)}
        if prefix in choices:
            expected.add(0)
        assert allowed == expected, (prefix, allowed, expected)
        assert guide.accepts(state) == (prefix in choices)
        frontier += [(prefix + texts[i], guide.next_state(state, i)) for i in allowed if i != 0]
    assert {"ab", "abc a", "cab c"} <= seen


@pytest.fixture(scope="module")
def smollm_llm():
    """A random Llama with SmolLM2's real tokenizer (49152 byte-level BPE tokens)."""
    tok = smollm2_tokenizer()
    model = make_hf_model("llama", seed=3, vocab_size=len(tok), eos_token_id=2, bos_token_id=1)
    return LLM(model, tokenizer=tok, kv_cache_memory_bytes=16 << 20)


def _texts(outs):
    return [(o.text, o.finish_reason, o.token_ids) for r in outs for o in r.outputs]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_engine_outputs_follow_their_constraints(smollm_llm, temperature):
    """Choice, regex and JSON-schema requests in one batch with an unconstrained one (n = 2, seeded):
    every constrained output matches and ends with EOS; the unconstrained request's output is what it
    is alone."""
    llm = smollm_llm
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6}, "age": {"type": "integer"},
                                               "ok": {"type": "boolean"}}, "required": ["name", "age", "ok"]}
    kinds = [StructuredOutputsParams(choice=["yes", "no", "maybe later"]),
             StructuredOutputsParams(regex=r"[0-9]{3}-[a-z]{2,4}"), StructuredOutputsParams(json=json.dumps(schema))]
    base = dict(max_tokens=60, temperature=temperature, seed=4, n=2)
    prompts = ["Hello there", "Pick one:", "Tell me about it", "Once upon"]
    params = [SamplingParams(**base, structured_outputs=k) for k in kinds] + [SamplingParams(**base)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    for (kind, out) in zip(kinds, outs):
        for o in out.outputs:
            assert o.finish_reason == "stop" and o.token_ids[-1] == 2, (o.text, o.finish_reason)
            if kind.choice:
                assert o.text in kind.choice
            elif kind.regex:
                assert re.fullmatch(kind.regex, o.text), o.text
            else:
                doc = json.loads(o.text)
                assert list(doc) == ["name", "age", "ok"] and isinstance(doc["name"], str) and len(doc["name"]) <= 6
                assert type(doc["age"]) is int and type(doc["ok"]) is bool
    alone = llm.generate([prompts[3]], SamplingParams(**base), use_tqdm=False)
    assert _texts(alone) == _texts(outs[3:])


def test_guided_decoding_alias_and_preemption(smollm_llm):
    """vLLM's earlier name (guided_decoding) works the same; a pool small enough to preempt and recompute
    sequences mid-structure keeps every output valid."""
    from fastinfer import GuidedDecodingParams
    pattern = r"\[(?:[a-z]{1,6}, ){3,6}[a-z]{1,6}\]"
    params = SamplingParams(max_tokens=80, temperature=1.0, seed=9, guided_decoding=GuidedDecodingParams(regex=pattern))
    assert params.structured_outputs is params.guided_decoding
    llm = LLM(smollm_llm.engine.loaded, num_blocks=10, max_num_seqs=8)
    prompts = [f"Please write list number {i} of some short lowercase words, separated by commas:" for i in range(8)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert all(re.fullmatch(pattern, o.text) for r in outs for o in r.outputs), _texts(outs)
    assert llm.engine.scheduler.num_preemptions > 0, "the pool did not force a preemption: the test checks little"


def test_refused_combinations(smollm_llm):
    so = StructuredOutputsParams(choice=["a"])
    with pytest.raises(ValueError, match="min_tokens is not supported with structured_outputs"):
        smollm_llm.generate(["x"], SamplingParams(min_tokens=2, structured_outputs=so), use_tqdm=False)
    spec = LLM(smollm_llm.engine.loaded, kv_cache_memory_bytes=8 << 20, speculative={"method": "ngram", "num_tokens": 2})
    with pytest.raises(ValueError, match="structured_outputs are not supported with speculative decoding"):
        spec.generate(["x"], SamplingParams(structured_outputs=so), use_tqdm=False)
    bare = LLM(make_hf_model("llama", seed=3), kv_cache_memory_bytes=8 << 20)
    with pytest.raises(ValueError, match="structured_outputs need a tokenizer"):
        bare.generate([[5, 6]], SamplingParams(structured_outputs=so), use_tqdm=False)
    # a constraint interegular cannot compile fails at submission, before anything runs
    with pytest.raises(ValueError, match="structured_outputs"):
        smollm_llm.generate(["x"], SamplingParams(structured_outputs=StructuredOutputsParams(regex=r"(?<=a)b")),
                            use_tqdm=False)


def test_string_pattern_is_grouped_and_kept_inside_the_string():
    schema = {"type": "object", "properties": {"a": {"type": "string", "pattern": "^x|y$"}, "b": {"type": "integer"}},
              "required": ["a", "b"]}
    pattern = json_schema_regex(schema)
    assert re.fullmatch(pattern, '{"a": "x", "b": 1}') and re.fullmatch(pattern, '{"a": "y", "b": 1}')
    assert not re.fullmatch(pattern, '{"a": "x}') and not re.fullmatch(pattern, '{y", "b": 1}')
    assert re.fullmatch(json_schema_regex({"type": "string", "pattern": r"^cost\$$"}), '"cost$"')
    for bad in (r"^.+$", "a\n?", r'a"b'):
        with pytest.raises(ValueError, match="quote, a backslash or a control character"):
            json_schema_regex({"type": "string", "pattern": bad})
    both = json_schema_regex({"type": ["string", "null"], "maxLength": 2})  # each type takes its own keywords
    assert re.fullmatch(both, '"ab"') and re.fullmatch(both, "null") and not re.fullmatch(both, '"abc"')
    assert StructuredOutputsParams(regex="^ab$").pattern == "ab"  # anchors: whole outputs match anyway


class _SentencePiece(_Tokenizer):
    """SentencePiece-style pieces (▁ = a space, <0xHH> byte fallback); strip_first: the decoder drops the
    leading space of the first piece (Llama / Mistral) or keeps it (Gemma)."""

    def __init__(self, texts, strip_first, special=(), added_special=()):
        super().__init__(texts, special)
        self.strip_first = strip_first
        self.added_tokens_decoder = {i: type("Added", (), {"special": True})() for i in added_special}

    def convert_tokens_to_string(self, tokens):
        out = "".join(chr(int(t[3:5], 16)) if re.fullmatch(r"<0x[0-9A-F]{2}>", t) else t.replace("\u2581", " ")
                      for t in tokens)
        return out[1:] if self.strip_first and out.startswith(" ") else out


@pytest.mark.parametrize("strip_first", [True, False])
def test_vocabulary_texts_of_sentencepiece_pieces(strip_first):
    texts = ["<s>", "</s>", "a", "\u2581hello", "hello", "<0x41>", "\u2581", "<|fim|>", "b"]
    vocab = Vocabulary(_SentencePiece(texts, strip_first, special=[0, 1], added_special=[7]), len(texts))
    assert vocab.texts == [None, None, "a", " hello", "hello", "A", " ", None, "b"]
    guide = TokenGuide(r" hello(A| b)", vocab, {1})
    first = set(torch.nonzero(guide.mask(guide.initial, torch.device("cpu"))).flatten().tolist())
    assert first == {3, 6}  # "▁hello", or "▁" then "hello"; never the special <|fim|>


def test_patterns_no_token_can_produce_are_refused_and_dead_branches_pruned(smollm_llm):
    """SmolLM2's byte-level vocabulary holds 😀 only as byte pieces: a constraint that needs it is refused
    at submission; one where it is an alternative never goes down that branch."""
    with pytest.raises(ValueError, match="no output the tokenizer can produce matches the constraint"):
        smollm_llm.generate(["x"], SamplingParams(structured_outputs=StructuredOutputsParams(choice=["\U0001F600"])),
                            use_tqdm=False)
    so = StructuredOutputsParams(regex="a(\U0001F600|b)c")
    outs = smollm_llm.generate(["x", "y"], SamplingParams(max_tokens=8, temperature=1.0, seed=1, structured_outputs=so),
                               use_tqdm=False)
    assert [o.outputs[0].text for o in outs] == ["abc", "abc"]


def test_stop_tokens_and_ignore_eos(smollm_llm):
    """ignore_eos keeps the request's own stop_token_ids (allowed, and stopping, where the structure is
    complete); with no stop token left, a finished structure ends the sequence ("stop") right after its
    last character."""
    nl = smollm_llm.engine.tokenizer.convert_tokens_to_ids("\u010a")  # byte-level "\n"
    choice = StructuredOutputsParams(choice=["yes", "no"])
    out = smollm_llm.generate(["x"], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, stop_token_ids=[nl],
                                                    structured_outputs=choice), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == nl and out.text[:-1] in ("yes", "no")
    out = smollm_llm.generate(["x"], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True,
                                                    structured_outputs=choice), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason is None and out.text in ("yes", "no")


@pytest.mark.parametrize("kwargs, match", [
    (dict(allowed_token_ids=[5]), "allowed_token_ids is not supported with structured_outputs"),
    (dict(bad_words_ids=[[5]]), "bad_words_ids is not supported with structured_outputs"),
    (dict(logit_bias={5: float("-inf")}), "logit_bias with -inf is not supported with structured_outputs"),
])
def test_restrictions_that_could_empty_a_row_are_refused(smollm_llm, kwargs, match):
    so = StructuredOutputsParams(choice=["yes", "no"])
    with pytest.raises(ValueError, match=match):
        smollm_llm.generate(["x"], SamplingParams(structured_outputs=so, **kwargs), use_tqdm=False)
    ok = smollm_llm.generate(["x"], SamplingParams(max_tokens=4, structured_outputs=so, logit_bias={5: 2.0}),
                             use_tqdm=False)[0].outputs[0]
    assert ok.text in ("yes", "no")


def test_automaton_caches_are_bounded(monkeypatch):
    """A long structure walks many states: the per-state arrays are an LRU, and a state dropped from it is
    walked again with the same result."""
    texts = ["<eos>", "a", "b", "ab"]
    vocab = Vocabulary(_Tokenizer(texts, special=[0]), len(texts))
    guide = TokenGuide("[ab]{0,40}", vocab, {0})
    monkeypatch.setattr(guide, "max_cached_states", 4)
    state, seen = guide.initial, []
    for _ in range(20):
        seen.append((state, guide.mask(state, torch.device("cpu")).clone()))
        state = guide.next_state(state, 3)  # "ab"
    assert len(guide._cache) <= 4 and len(guide._masks) <= 4
    for s, m in seen:
        assert torch.equal(guide.mask(s, torch.device("cpu")), m)


def test_json_object_regex_bounds_the_nesting():
    pattern = json_object_regex()
    good = ['{}', '{"a": 1}', '{"a": {"b": [1, 2, "x"]}}', '{"a":[],"b":{},"c":"x\\"y","d":-1.5e3,"e":true}',
            '{"a": [{"b": 1}, {}], "c": null}']
    bad = ['[]', '1', '"x"', '{"a": 1,}', '{a: 1}', '{"a": {"b": {"c": {"d": 1}}}}', '{"a": [[[1]]]}',
           '{"a": [{"b": []}]}', '{"a": 01}']
    for doc in good:
        assert re.fullmatch(pattern, doc), doc
        assert isinstance(json.loads(doc), dict)
    for doc in bad:
        assert not re.fullmatch(pattern, doc), doc


def test_engine_json_object_outputs_parse(smollm_llm):
    """vLLM's json_object: every output (sampled, n = 3) is a JSON object that ends with EOS. The random model
    would ramble inside a string forever, so a logit_bias pulls it to the quote, colon and brace tokens."""
    tok = smollm_llm.get_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in ['"', ":", "}", "1", "[", "]", "{"]}
    bias = {ids['"']: 30.0, ids[":"]: 30.0, ids["}"]: 20.0, ids["1"]: 10.0, ids["["]: 15.0, ids["{"]: 15.0, ids["]"]: 20.0}
    params = SamplingParams(max_tokens=120, temperature=1.0, seed=7, n=3, logit_bias=bias,
                            structured_outputs=StructuredOutputsParams(json_object=True))
    for out in smollm_llm.generate(["Describe a cat as JSON:", "Data"], params, use_tqdm=False):
        for o in out.outputs:
            assert o.finish_reason == "stop" and o.token_ids[-1] == 2, (o.finish_reason, o.text)
            assert isinstance(json.loads(o.text), dict), o.text
