"""Structured output on the fake backend: JSON schemas, regexes and grammars constrain every token."""

from __future__ import annotations

import json
import re
import threading

import jsonschema
import numpy as np
import pydantic
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import infer
from infer.errors import BackendError, GrammarError, InvalidParameterError

pytestmark = pytest.mark.integration

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_output_under_a_json_schema_parses_and_validates(fake, temperature):
    reply = fake.generate("a person:", response_format=PERSON, temperature=temperature, seed=7, max_tokens=200)
    assert reply.finish_reason == "stop", reply.text
    jsonschema.validate(json.loads(reply.text), PERSON)


def test_the_openai_json_schema_shape_and_json_mode_are_accepted(fake):
    wrapped = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    reply = fake.generate("p", response_format=wrapped, temperature=0.8, seed=1, max_tokens=200)
    jsonschema.validate(json.loads(reply.text), PERSON)
    # JSON mode: any object; the random fake may not close it, so check the prefix is an object.
    mode = fake.generate("p", response_format={"type": "json_object"}, temperature=0.8, seed=2, max_tokens=8)
    assert mode.text.startswith("{")


def test_a_pydantic_model_class_is_a_schema(fake):
    class Point(pydantic.BaseModel):
        x: bool
        y: bool

    reply = fake.generate("p", response_format=Point, temperature=1.0, seed=3, max_tokens=100)
    assert Point.model_validate_json(reply.text)


def test_output_under_a_regex_matches_it_in_full(fake):
    pattern = r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])"
    for seed in range(5):
        fmt = {"type": "regex", "pattern": pattern}
        reply = fake.generate("when?", response_format=fmt, temperature=1.0, seed=seed)
        assert re.fullmatch(pattern, reply.text), reply.text
        assert reply.finish_reason == "stop"


def test_output_under_a_grammar_is_one_of_its_sentences(fake):
    grammar = 'start: answer " " mood\nanswer: "yes" | "no"\nmood: "!" | "?"'
    seen = {
        fake.generate("q", response_format={"type": "grammar", "grammar": grammar}, temperature=1.0, seed=s).text
        for s in range(12)
    }
    assert seen <= {"yes !", "yes ?", "no !", "no ?"}
    assert len(seen) > 1  # sampled, not forced onto one path


def test_a_gbnf_grammar_as_llama_cpp_writes_them_is_accepted(fake):
    gbnf = 'root ::= "a" [0-9] [0-9]'
    reply = fake.generate("q", response_format={"type": "grammar", "grammar": gbnf}, temperature=1.0, seed=4)
    assert re.fullmatch(r"a[0-9]{2}", reply.text), reply.text


@pytest.mark.parametrize(
    ("response_format", "named"),
    [
        ({"type": "regex", "pattern": "[a-"}, "regex"),
        ({"type": "grammar", "grammar": "start: undefined_rule"}, "grammar"),
        ({"type": "nonsense-schema-type"}, "json schema"),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, "json_schema.schema"),
        ({"type": "regex"}, "pattern"),
        ("not a mapping", "mapping"),
    ],
)
def test_a_bad_response_format_raises_a_grammar_error_naming_it_and_the_model_stays_usable(
    fake, response_format, named
):
    with pytest.raises(GrammarError, match=named) as caught:
        fake.generate("x", response_format=response_format)
    assert isinstance(caught.value, InvalidParameterError)
    assert caught.value.parameter == "response_format"
    assert fake.generate("x", max_tokens=3, temperature=0, ignore_eos=True).token_ids


def test_ignore_eos_cannot_be_combined_with_a_constraint(fake):
    with pytest.raises(InvalidParameterError, match="ignore_eos"):
        fake.generate("x", response_format=PERSON, ignore_eos=True)


def test_a_text_response_format_leaves_output_unconstrained(fake):
    free = fake.generate("x", max_tokens=6, temperature=0, ignore_eos=True)
    text = fake.generate("x", max_tokens=6, temperature=0, ignore_eos=True, response_format={"type": "text"})
    assert text.token_ids == free.token_ids


def test_constrained_and_free_requests_batched_together_each_keep_their_own_rules(fake):
    solo = fake.generate("free", max_tokens=24, temperature=0.9, seed=11, ignore_eos=True).token_ids
    results: dict[str, infer.Completion] = {}

    def run(name: str, **kw: object) -> None:
        results[name] = fake.generate(name, **kw)  # type: ignore[arg-type]

    threads = [
        threading.Thread(
            target=run, args=("free",), kwargs={"max_tokens": 24, "temperature": 0.9, "seed": 11, "ignore_eos": True}
        ),
        *(
            threading.Thread(
                target=run,
                args=(f"json{i}",),
                kwargs={"response_format": PERSON, "temperature": 0.9, "seed": i, "max_tokens": 200},
            )
            for i in range(3)
        ),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results["free"].token_ids == solo
    for i in range(3):
        jsonschema.validate(json.loads(results[f"json{i}"].text), PERSON)


def test_logprobs_of_constrained_tokens_are_the_models_own_not_renormalised(fake):
    prompt = fake.encode("x")
    events = list(
        fake.stream(prompt, response_format={"type": "regex", "pattern": "[0-9]{4}"}, temperature=0, logprobs=True)
    )
    assert len(events) == 5 and events[4].token_id in fake.eos_token_ids
    assert fake.decode([e.token_id for e in events[:4]]).isdigit()
    kv = fake.new_sequence(len(prompt) + 1)
    try:
        row = fake.run_prefill([kv], [prompt])[0].astype(np.float64)
    finally:
        kv.release()
    log_softmax = row - row.max() - np.log(np.exp(row - row.max()).sum())
    assert events[0].logprob == pytest.approx(log_softmax[events[0].token_id], abs=1e-5)
    assert events[0].token_id != int(row.argmax()) or log_softmax.max() == pytest.approx(events[0].logprob)


def test_a_sampler_that_ignores_the_token_mask_fails_only_with_a_typed_error(fake):
    class Careless:
        @infer.hookimpl(tryfirst=True)
        def infer_sample(self, logits, params, states):
            return np.argmax(logits, axis=1).astype(np.int64)  # ignores states[i].token_mask

    registry = infer.plugins.get_registry()
    registry.pm.register(Careless(), name="careless-sampler")
    try:
        with pytest.raises(BackendError, match="token_mask"):
            fake.generate("x", response_format={"type": "regex", "pattern": "z{8}"}, temperature=0)
    finally:
        registry.pm.unregister(name="careless-sampler")
    reply = fake.generate("x", response_format={"type": "regex", "pattern": "z{3}"}, temperature=0)
    assert reply.text == "zzz"


# -- property: any schema of the supported subset gives output that validates ------------------------

_leaf = st.one_of(
    st.just({"type": "boolean"}),
    st.integers(-50, 50).map(lambda lo: {"type": "integer", "minimum": lo, "maximum": lo + 100}),
    st.lists(st.text(alphabet="abcxyz", min_size=1, max_size=4), min_size=1, max_size=3, unique=True).map(
        lambda values: {"enum": values}
    ),
    st.integers(0, 6).map(lambda n: {"type": "string", "maxLength": n}),
    st.just({"type": "null"}),
)
_schema = st.recursive(
    _leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=1).map(
            lambda items: (
                {"type": "array", "items": items[0], "maxItems": 2} if items else {"type": "array", "maxItems": 0}
            )
        ),
        st.dictionaries(st.sampled_from(["a", "b", "c", "d"]), inner, min_size=1, max_size=3).map(
            lambda props: {
                "type": "object",
                "properties": props,
                "required": sorted(props),
                "additionalProperties": False,
            }
        ),
    ),
    max_leaves=5,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=_schema, temperature=st.sampled_from([0.0, 0.7, 1.5]), seed=st.integers(0, 2**16))
def test_every_generated_schema_gives_output_that_parses_and_validates(fake, schema, temperature, seed):
    reply = fake.generate("go", response_format=schema, temperature=temperature, seed=seed, max_tokens=300)
    assert reply.finish_reason == "stop", (schema, reply.text)
    jsonschema.validate(json.loads(reply.text), schema)
