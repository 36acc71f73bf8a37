"""Plain helpers for the onnx backend tests (fixtures live in conftest.py)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from infer.bundle import Bundle
from infer.contract import Batch, KVCache, LoadSpec, token_rows
from infer_backend_onnx import plugin
from infer_backend_onnx.runtime import OnnxModel

Loader = Callable[..., OnnxModel]

#: A prompt of the tiny vocabulary (ids < 384) long enough to cross a few cache rows.
PROMPT = [1, 45, 200, 17, 99, 3, 250, 7, 8, 301, 12, 64]


def load_spec(bundle: Bundle, *, dtype: str | None = None, device: str | None = None) -> LoadSpec:
    """What the core would pass to ``infer_load`` for ``bundle``."""
    return LoadSpec(backend="onnx", ref=str(bundle.path), path=bundle.path, bundle=bundle, dtype=dtype, device=device)


def step(
    model: OnnxModel, caches: list[KVCache], rows: list[list[int]], *, decode: bool = False
) -> npt.NDArray[np.float32]:
    """One prefill (or decode) through the plugin's hooks."""
    batch = Batch(tuple(caches), token_rows(rows))
    hook = plugin.infer_decode if decode else plugin.infer_prefill
    logits = hook(model, batch)
    assert logits is not None
    return logits
