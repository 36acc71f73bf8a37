"""Certification on the real model: SmolLM2-135M-Instruct through each backend that runs here."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from conftest import REAL_BACKENDS, runnable

import infer

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.mark.parametrize("backend", REAL_BACKENDS)
def test_smollm2_answers_2_plus_2_with_4_within_30_seconds(smollm2, backend):
    runnable(backend)
    started = time.monotonic()
    with infer.load(smollm2, backend=backend, dtype="fp32") as model:
        reply = model.generate(messages=[{"role": "user", "content": "What is 2+2?"}], temperature=0, max_tokens=48)
    elapsed = time.monotonic() - started
    assert "4" in reply.text, reply.text
    assert reply.finish_reason == "stop"
    assert elapsed < 30, f"load + generate took {elapsed:.1f} s"


@pytest.mark.parametrize("backend", REAL_BACKENDS)
def test_fp32_greedy_matches_transformers_for_the_first_32_tokens(smollm2, goldens, backend):
    runnable(backend)
    with infer.load(smollm2, backend=backend, dtype="fp32") as model:
        for case in goldens["cases"]:
            expected = case["greedy_ids"][:32]
            assert model.encode(case["prompt_text"], add_special_tokens=False) == case["prompt_ids"]
            got = model.generate(case["prompt_ids"], temperature=0, max_tokens=len(expected), ignore_eos=True)
            assert list(got.token_ids) == expected, f"{case['kind']} prompt {case['prompt_text'][-40:]!r}"


def test_chat_messages_render_to_the_prompt_transformers_used(smollm2, goldens):
    runnable("onnx")
    with infer.load(smollm2, backend="onnx") as model:
        for case in goldens["cases"]:
            if case["kind"] == "chat":
                assert model.apply_chat_template(case["messages"]) == case["prompt_text"]


def test_the_readme_run_command_answers_on_the_default_backend(smollm2):
    runnable("onnx")
    result = subprocess.run(
        [sys.executable, "-m", "infer.cli", "run", "smollm2-135m-instruct", "What is 2+2?"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "4" in result.stdout


def test_streams_on_the_real_model_are_concurrent_and_match_sequential_runs(smollm2):
    runnable("onnx")
    from concurrent.futures import ThreadPoolExecutor

    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "The sky is"]
    with infer.load(smollm2, backend="onnx") as model:
        sequential = [model.generate(p, max_tokens=12, temperature=0, ignore_eos=True).token_ids for p in prompts]
        with ThreadPoolExecutor(4) as pool:
            concurrent = list(
                pool.map(lambda p: model.generate(p, max_tokens=12, temperature=0, ignore_eos=True).token_ids, prompts)
            )
    assert concurrent == sequential


def test_int4_requests_joining_and_leaving_a_batch_get_the_tokens_they_get_alone(smollm2, tmp_path):
    # int4 kernels round a lone row differently from rows in company; the backend pairs lone rows
    # and reuses free rows as requests come and go, so a request's tokens never depend on timing.
    runnable("onnx")
    import random
    import threading

    rng = random.Random(1)
    prompts = [f"Tell me fact number {i} about the sea." for i in range(12)]
    lengths = [rng.randint(16, 40) for _ in prompts]
    delays = [rng.random() * 0.4 for _ in prompts]
    with infer.load(smollm2, backend="onnx", dtype="int4", cache_dir=tmp_path) as model:
        alone = [
            model.generate(p, max_tokens=n, temperature=0, ignore_eos=True).token_ids
            for p, n in zip(prompts, lengths, strict=True)
        ]
        together: list[tuple[int, ...]] = [()] * len(prompts)

        def run(i: int) -> None:
            time.sleep(delays[i])
            together[i] = model.generate(prompts[i], max_tokens=lengths[i], temperature=0, ignore_eos=True).token_ids

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    assert together == alone


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_smollm2_answers_under_a_json_schema_with_json_that_validates(smollm2, temperature):
    import json

    import jsonschema

    runnable("onnx")
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 40}, "country": {"type": "string", "maxLength": 40}},
        "required": ["city", "country"],
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "place", "schema": schema, "strict": True}}
    with infer.load(smollm2, backend="onnx", dtype="int4") as model:
        reply = model.generate(
            messages=[{"role": "user", "content": "Name the capital of France and its country as JSON."}],
            response_format=fmt,
            temperature=temperature,
            seed=5,
            max_tokens=64,
        )
    assert reply.finish_reason == "stop", reply.text
    jsonschema.validate(json.loads(reply.text), schema)


def test_smollm2_calls_a_required_tool_with_arguments_that_fit_its_schema(smollm2):
    import json

    import jsonschema

    runnable("onnx")
    parameters = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 40}},
        "required": ["city"],
    }
    tools = [
        {
            "type": "function",
            "function": {"name": "get_weather", "description": "Weather in a city", "parameters": parameters},
        }
    ]
    with infer.load(smollm2, backend="onnx", dtype="int4") as model:
        reply = model.generate(
            messages=[{"role": "user", "content": "What is the weather in Paris?"}],
            tools=tools,
            tool_choice="required",
            temperature=0,
            max_tokens=64,
        )
    assert reply.finish_reason == "tool_calls", reply.text
    (call,) = reply.tool_calls
    assert call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), parameters)


def test_fp32_drafted_by_its_int4_weights_speculates_to_the_plain_greedy_tokens(smollm2, goldens):
    runnable("onnx")
    from collections import Counter

    from infer.plugins import get_registry

    class Steps:
        def __init__(self) -> None:
            self.count: Counter[str] = Counter()

        @infer.hookimpl(wrapper=True)
        def infer_draft(self, model, batch):
            self.count["draft"] += 1
            return (yield)

    with infer.load(smollm2, backend="onnx", dtype="fp32", draft="int4") as model:
        assert infer.Capability.DRAFT in model.capabilities
        steps = Steps()
        get_registry().pm.register(steps)
        try:
            for case in goldens["cases"]:
                expected = case["greedy_ids"][:32]
                got = model.generate(
                    case["prompt_ids"], temperature=0, max_tokens=len(expected), ignore_eos=True, speculative="ngram"
                )
                assert list(got.token_ids) == expected, f"{case['kind']} prompt {case['prompt_text'][-40:]!r}"
        finally:
            get_registry().pm.unregister(steps)
        assert steps.count["draft"] > 0
