"""Shared fixtures: the conformance tiny Llama bundle, its numpy reference, and built packages."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

try:
    import infer_conformance  # noqa: F401
except ImportError:
    # In the workspace checkout the conformance distribution may not be installed yet; its
    # sources sit beside this package, and the fixtures and reference need nothing else.
    _CONFORMANCE_SRC = Path(__file__).resolve().parents[3] / "conformance" / "src"
    if not (_CONFORMANCE_SRC / "infer_conformance").is_dir():
        raise
    sys.path.insert(0, str(_CONFORMANCE_SRC))

from infer.bundle import Bundle
from infer.contract import Batch, token_rows
from infer_backend_coreml.builder import ConstantKV, evaluate_step
from infer_backend_coreml.options import BuildConfig
from infer_backend_coreml.runtime import CoreMLModel
from infer_conformance.fixtures import TINY_LLAMA
from infer_conformance.reference import ReferenceModel

Pairs = list[tuple[np.ndarray, np.ndarray]]


def _greedy_pairs(model: CoreMLModel, reference: ReferenceModel, prompt: list[int], steps: int) -> Pairs:
    seq = model.new_sequence(model.context_length)
    cache = reference.new_cache()
    pairs = [(model.prefill(Batch((seq,), token_rows([prompt])))[0], reference.step(cache, prompt)[-1])]
    for _ in range(steps):
        token = int(np.argmax(pairs[-1][1]))
        pairs.append((model.decode(Batch((seq,), token_rows([[token]])))[0], reference.step(cache, [token])[-1]))
    return pairs


@pytest.fixture(scope="session")
def greedy_pairs() -> Callable[[CoreMLModel, ReferenceModel, list[int], int], Pairs]:
    """``f(model, reference, prompt, steps)``: (backend, reference) last-token logits after the
    prefill and after each of ``steps`` decodes, both fed the reference's greedy tokens (so one
    early difference cannot derail the rest)."""
    return _greedy_pairs


@pytest.fixture(scope="session")
def tiny_bundle() -> Bundle:
    """The conformance suite's 2-layer Llama bundle (hidden 64, 4 heads over 2 KV heads)."""
    return Bundle.open(TINY_LLAMA)


@pytest.fixture(scope="session")
def reference(tiny_bundle: Bundle) -> ReferenceModel:
    """The numpy oracle for the tiny bundle."""
    return ReferenceModel(tiny_bundle)


@pytest.fixture(scope="session")
def build_tiny(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Bundle) -> Callable[[BuildConfig], Path]:
    """Build (once per configuration) the tiny bundle's package; returns its path."""
    from infer_backend_coreml.builder import build_package

    built: dict[BuildConfig, Path] = {}

    def build(config: BuildConfig) -> Path:
        if config not in built:
            folder = tmp_path_factory.mktemp(f"coreml-{config.dtype}")
            built[config] = build_package(
                tiny_bundle.spec, tiny_bundle.weights, config, folder / "model.mlpackage", metadata={"test": "yes"}
            )
        return built[config]

    return build


class FoldingExecutor:
    """Runs the package's functions by MIL value inference in numpy (no Core ML runtime needed).

    It stands in for ``CoreMLExecutor`` so the handle's stepping logic and the graph's numbers
    can be tested on any platform; each state is a :class:`ConstantKV`.
    """

    def __init__(self, bundle: Bundle, config: BuildConfig) -> None:
        self.bundle, self.config = bundle, config
        self.calls: list[tuple[str, int, int]] = []  # (function, position, tokens fed)

    def new_state(self) -> ConstantKV:
        return ConstantKV.zeros(self.bundle.spec, self.config)

    def prefill(self, state: ConstantKV, input_ids: Any, position: int, last_index: int) -> Any:
        self.calls.append(("prefill", position, last_index + 1))
        return evaluate_step(
            self.bundle.spec,
            self.bundle.weights,
            self.config,
            state,
            input_ids,
            position=position,
            last_index=last_index,
        )

    def decode(self, state: ConstantKV, input_ids: Any, position: int) -> Any:
        self.calls.append(("decode", position, 1))
        return evaluate_step(self.bundle.spec, self.bundle.weights, self.config, state, input_ids, position=position)


@pytest.fixture
def folded_model(tiny_bundle: Bundle) -> Callable[..., CoreMLModel]:
    """A :class:`CoreMLModel` of the tiny bundle whose functions run through :class:`FoldingExecutor`."""

    def make(dtype: str = "fp32", context_length: int = 48, prefill_chunk: int = 4) -> CoreMLModel:
        config = BuildConfig(dtype=dtype, context_length=context_length, prefill_chunk=prefill_chunk)
        return CoreMLModel(
            FoldingExecutor(tiny_bundle, config),
            config=config,
            vocab_size=tiny_bundle.spec.vocab_size,
            kv_bytes=1,
            device="cpu",
        )

    return make


@pytest.fixture
def fold_bundle() -> Callable[..., CoreMLModel]:
    """``f(bundle, dtype, context_length, prefill_chunk)``: a :class:`CoreMLModel` of any bundle whose
    functions run through :class:`FoldingExecutor`."""

    def make(bundle: Bundle, dtype: str = "fp32", context_length: int = 48, prefill_chunk: int = 4) -> CoreMLModel:
        config = BuildConfig(dtype=dtype, context_length=context_length, prefill_chunk=prefill_chunk)
        executor = FoldingExecutor(bundle, config)
        return CoreMLModel(executor, config=config, vocab_size=bundle.spec.vocab_size, kv_bytes=1, device="cpu")

    return make
