"""Paths of the data shipped with infer-conformance: the tiny model bundle and the goldens.

``TINY_LLAMA`` is a complete Hugging Face-layout bundle (2 layers, hidden 64, 384-token
byte-level BPE, ChatML template) built by ``tools/make_tiny_fixture.py``; ``GOLDENS`` holds
logits and greedy continuations produced by an independent implementation
(``tools/py_ref/make_goldens.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

__all__ = [
    "DATA",
    "FAMILY_FIXTURES",
    "GEMMA3_GOLDENS",
    "GOLDENS",
    "SMOLLM2_GOLDENS",
    "TINY_LLAMA",
    "TINY_LLAMA_GOLDENS",
    "goldens_of",
]

#: Folder of the package data.
DATA: Final = Path(__file__).resolve().parent / "data"
#: The tiny Llama bundle.
TINY_LLAMA: Final = DATA / "tiny-llama"
#: Folder of the golden outputs.
GOLDENS: Final = DATA / "goldens"
#: Logits (``.npz``) and greedy continuations (``.json``) of the tiny bundle.
TINY_LLAMA_GOLDENS: Final = GOLDENS / "tiny-llama"
#: Greedy continuations of SmolLM2-135M-Instruct (fp32), prompts and ids included.
SMOLLM2_GOLDENS: Final = GOLDENS / "smollm2.json"
#: Greedy continuations of Gemma 3 270M base (fp32 of the Q4_K_M GGUF), prompts and ids included.
GEMMA3_GOLDENS: Final = GOLDENS / "gemma3-270m.json"
#: Family name -> tiny bundle of that family (tools/make_family_fixtures.py). The goldens of
#: bundle ``X`` are ``GOLDENS / f"{X.name}.npz"`` and ``.json`` (the format
#: ``tools/py_ref/make_goldens.py`` writes); the suite grades a backend on every family listed
#: here that it loads.
FAMILY_FIXTURES: Final[dict[str, Path]] = {
    "llama": TINY_LLAMA,
    "mistral": DATA / "tiny-mistral",
    "qwen3": DATA / "tiny-qwen3",
    "gemma3": DATA / "tiny-gemma3",
    "gemma2": DATA / "tiny-gemma2",
    "phi3": DATA / "tiny-phi3",
    "smollm3": DATA / "tiny-smollm3",
}


def goldens_of(fixture: Path) -> tuple[Path, Path]:
    """The logits (``.npz``) and prompts/greedy (``.json``) golden files of a fixture bundle."""
    return GOLDENS / f"{fixture.name}.npz", GOLDENS / f"{fixture.name}.json"
