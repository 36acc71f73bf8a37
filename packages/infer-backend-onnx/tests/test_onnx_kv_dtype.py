"""The real model with a float16 KV cache: the same greedy tokens as with a float32 cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

#: Tokens compared per prompt (the issue's bar: the first 64 greedy tokens unchanged).
NEW_TOKENS = 64
#: A long prompt too: fp16 rounding of every cached key and value adds up over the context.
LONG_PROMPT_TOKENS = 1536


def _prompts(model) -> list[list[int]]:  # type: ignore[no-untyped-def]
    fixtures = pytest.importorskip("infer_conformance.fixtures", reason="needs infer-conformance (the goldens)")
    cases = json.loads(fixtures.SMOLLM2_GOLDENS.read_text())["cases"]
    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    long = model.encode(readme, add_special_tokens=False)[:LONG_PROMPT_TOKENS]
    assert len(long) == LONG_PROMPT_TOKENS
    return [case["prompt_ids"] for case in cases] + [long]


def test_fp16_kv_keeps_the_first_64_greedy_tokens_of_the_fp32_cache(
    smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """At float32 weights and activations. Not asserted for ``native`` (int4 blocks with int8
    activations): there any perturbation flips near-ties, and fp16 KV was measured to part from
    fp32 KV within 25 tokens on 5 of these 9 prompts, as the quantized weights part from float32
    ones (see infer_conformance.tolerances); which is one reason the default cache stays fp32."""
    import infer

    dtype = "fp32"

    cache_dir = tmp_path_factory.getbasetemp() / "kv-dtype-builds"
    runs: dict[str, list[list[int]]] = {}
    for kv in ("fp32", "fp16"):
        with infer.load(smollm2_gguf, backend="onnx", dtype=dtype, cache_dir=cache_dir, kv_dtype=kv) as model:
            assert model.handle.details["kv_dtype"] == kv
            runs[kv] = [
                list(model.generate(ids, temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True).token_ids)
                for ids in _prompts(model)
            ]
    for n, (full, half) in enumerate(zip(runs["fp32"], runs["fp16"], strict=True)):
        assert half == full, f"prompt {n}: fp16 KV {half} parts from fp32 KV {full}"
