"""How close a backend must come to the goldens: bounds the suite owns, one per precision.

The goldens are float32 logits from transformers (``tools/py_ref``). A backend is graded at the
precision it loaded (``Model.dtype``) against the bound below; the ``logits_atol`` it declares
may tighten that bound (``min``), never loosen it: a backend cannot pass by declaring 1.0.

Why these numbers (measured with the ONNX backend on the tiny Llama fixture, whose logits reach
about 13.5 in magnitude; SmolLM2-135M's reach about 28):

- ``fp32``: two correct float32 implementations differ by summation order only: the ONNX
  backend is 7.6e-6 from the goldens, the float64 numpy reference ~1e-6. ``1e-4`` leaves an
  order of magnitude for other kernels, while a wrong RoPE pairing or grouped-query mapping moves
  logits by 0.1 to several units.
- ``fp16`` / ``bf16``: 11 (8) significant bits per activation; the ONNX fp16 graph is 0.016
  from the goldens. ``5e-2`` is 3x that; bf16 has 8x fp16's rounding step, hence ``0.15``
  (not measured here: no backend offers bf16 yet). Both stay far below what a maths bug does.
- ``int8`` / ``int4``: weight quantization moves logits by a sizeable fraction of their range
  (ONNX int4 is up to 3.3 from the goldens), so an absolute bound cannot separate "quantized"
  from "wrong". They are graded on what quantization must keep: at every teacher-forced step the
  golden next token is among the backend's top 5, and the backend's top 5 overlaps the golden
  top 5 by at least 60% on average (ONNX int4: 100% and 83%), with a loose absolute bound (5.0
  for int4, 2.0 for int8, an estimate: no int8 backend yet) that catches gross errors such as
  wrong scales or garbage rows. Greedy continuations are compared exactly only at fp32/fp16;
  for quantized precisions the first greedy token must be among the golden top 5. On the real
  model (SmolLM2, greedy ids only) a quantized backend is fed the golden continuation: its
  favourite must be the golden token at >= 50% of the steps and its top 5 must hold it at >= 85%
  (ONNX int4: 67% and 94%; fp16: 100% and 100%; free-running int4 greedy parts from the goldens
  at the first token in 5 of 8 prompts, so exact greedy would refuse a correct int4 backend).

KV cache precision: a backend may keep its cache in another precision than it computes in (the
ONNX backend's ``kv_dtype`` load option); it says so with a ``kv_dtype`` entry in the model's
``details``. Every key and value is then rounded to the cache's precision, so the model is graded
on the looser of the two bounds: float32 weights with a float16 cache on the fp16 bound (the ONNX
backend so configured is 5.9e-3 from the tiny Llama's reference, against 6.7e-6 with a float32
cache), greedy still compared exactly. A quantized precision keeps its own, looser, grading.

Native precision: a backend may load a model at ``"native"``, the file's own precision (the ONNX
backend's default for a GGUF: its quantized blocks run as stored). The suite grades such a model
at the precision it really computes: the backend says which in its ``details``, either as
``compute_dtype`` naming a bound above (a float bundle loaded native computes ``fp32``) or as
``weight_types``, the GGML types of its weights. The coarsest weight type decides: 4-bit types
(``Q4_0``, ``Q4_1``, ``Q4_K``, ``IQ4_*``) take the ``int4`` bound, 5- to 8-bit types
(``Q5_*``, ``Q6_K``, ``Q8_*``) ``int8``, ``F16`` and ``BF16`` their float bounds (a GGUF's half
weights may have been rounded from float32 originals), ``F32`` ``fp32``. Types below 4 bits
have no bound: a backend cannot be certified on them until one is argued for here. SmolLM2's
Q4_1 GGUF (``Q4_1`` matrices, a ``Q8_0`` table, ``F32`` norms) is graded at ``int4``.

The declared ``logits_atol`` tightens the floating-point bounds. For quantized precisions it
describes the backend's self-consistency (prefill against decode, batched against alone), not
its distance from float32 weights, so the suite's bound stands alone there.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Final

import numpy as np
import numpy.typing as npt

__all__ = [
    "BOUNDS",
    "WEIGHT_TYPE_PRECISION",
    "Bound",
    "assert_consistent",
    "bound_for",
    "grade_logits",
    "model_bound",
    "model_precision",
]


@dataclass(frozen=True)
class Bound:
    """What a backend computing at one precision must achieve against the goldens."""

    #: Precision this bound applies to.
    dtype: str
    #: Largest absolute difference from a golden logit.
    atol: float
    #: Quantized weights: graded by top-k agreement; otherwise greedy must equal the goldens exactly.
    quantized: bool = False
    #: Size of the top-k sets compared at every position (quantized precisions).
    top_k: int = 5
    #: Least mean fraction of the golden top-k found in the backend's top-k (quantized precisions).
    top_k_overlap: float = 0.6
    #: Real-model greedy goldens (ids only), quantized precisions: fed the golden continuation, the
    #: share of steps whose golden next token is the backend's favourite, and within its top ``top_k``.
    teacher_forced_top1: float = 0.5
    teacher_forced_top_k: float = 0.85


#: The suite's bounds, by precision name (``BackendInfo.dtypes`` / ``Model.dtype``).
BOUNDS: Final[dict[str, Bound]] = {
    "fp32": Bound("fp32", atol=1e-4),
    "fp16": Bound("fp16", atol=5e-2),
    "bf16": Bound("bf16", atol=0.15),
    "int8": Bound("int8", atol=2.0, quantized=True),
    "int4": Bound("int4", atol=5.0, quantized=True),
}


#: The precision a weight of each GGML type is graded at (see the module docstring); ordered
#: finest first, so the coarsest type a model holds is the one latest in this table.
WEIGHT_TYPE_PRECISION: Final[dict[str, str]] = {
    "F64": "fp32",
    "F32": "fp32",
    "F16": "fp16",
    "BF16": "bf16",
    "Q8_0": "int8",
    "Q8_1": "int8",
    "Q8_K": "int8",
    "Q6_K": "int8",
    "Q5_0": "int8",
    "Q5_1": "int8",
    "Q5_K": "int8",
    "Q4_0": "int4",
    "Q4_1": "int4",
    "Q4_K": "int4",
    "IQ4_NL": "int4",
    "IQ4_XS": "int4",
}
_COARSENESS: Final = ("fp32", "fp16", "bf16", "int8", "int4")


def model_precision(dtype: str, details: Mapping[str, Any]) -> str:
    """The precision a model loaded at ``dtype`` is graded at: ``dtype`` itself, or for ``"native"``
    what the backend's ``details`` say it computes (``compute_dtype``, else ``weight_types``).

    Raises :class:`KeyError` saying what is missing when a native model does not say, or holds a
    weight type the suite has no bound for.
    """
    if dtype != "native":
        return dtype
    compute = details.get("compute_dtype")
    if compute in BOUNDS:
        return str(compute)
    types = details.get("weight_types")
    if not types:
        raise KeyError(
            "the model was loaded at dtype 'native' but its details name neither a compute_dtype the suite "
            f"knows ({', '.join(BOUNDS)}) nor its weight_types: the backend must report what it computes"
        )
    unknown = sorted(t for t in types if t not in WEIGHT_TYPE_PRECISION)
    if unknown:
        raise KeyError(
            f"the suite has no golden bound for weights of type {', '.join(unknown)}; "
            f"known: {', '.join(WEIGHT_TYPE_PRECISION)}"
        )
    return max((WEIGHT_TYPE_PRECISION[t] for t in types), key=_COARSENESS.index)


def bound_for(dtype: str, declared_atol: float, kv_dtype: str | None = None) -> Bound:
    """The bound for ``dtype``, tightened by the backend's declared tolerance for floating-point precisions.

    ``kv_dtype``, the cache's precision when it differs from ``dtype``, loosens a floating-point
    bound to the cache precision's when that one is looser.
    Raises :class:`KeyError` naming the known precisions when the suite has no bound for ``dtype``
    (a new precision needs a bound argued for here before a backend can be certified at it).
    """
    for name in (dtype, kv_dtype):
        if name is not None and name not in BOUNDS:
            raise KeyError(f"the suite has no golden bound for dtype {name!r}; known: {', '.join(BOUNDS)}")
    bound = BOUNDS[dtype]
    cache = BOUNDS[kv_dtype] if kv_dtype is not None else bound
    if not bound.quantized and cache.atol > bound.atol:
        bound = replace(cache, dtype=f"{dtype} with a {kv_dtype} cache", quantized=False)
    if not bound.quantized and declared_atol < bound.atol:
        return replace(bound, atol=declared_atol)
    return bound


def model_bound(model: Any) -> Bound:
    """:func:`bound_for` a loaded :class:`infer.Model`: the precision it computes at (:func:`model_precision`),
    its declared tolerance and its cache precision."""
    details = model.handle.details
    return bound_for(model_precision(model.dtype, details), model.logits_atol, details.get("kv_dtype"))


def grade_logits(got: npt.NDArray[np.floating], golden: npt.NDArray[np.floating], bound: Bound, what: str) -> None:
    """Assert that rows of logits ``got`` meet ``bound`` against ``golden`` (both ``[rows, vocab]``)."""
    got64, gold64 = np.atleast_2d(got).astype(np.float64), np.atleast_2d(golden).astype(np.float64)
    assert got64.shape == gold64.shape, f"{what}: logits of shape {got64.shape}, the goldens have {gold64.shape}"
    diff = np.abs(got64 - gold64)
    worst = np.unravel_index(int(np.argmax(diff)), diff.shape)
    assert diff[worst] <= bound.atol, (
        f"{what}: logit {worst[1]} of row {worst[0]} is off the golden by {diff[worst]:.3g}, more than the "
        f"{bound.dtype} bound {bound.atol:g}"
    )
    if not bound.quantized:
        return
    k = bound.top_k
    mine = np.argsort(-got64, axis=1, kind="stable")[:, :k]
    theirs = np.argsort(-gold64, axis=1, kind="stable")[:, :k]
    for row in range(len(mine)):
        assert theirs[row, 0] in mine[row], (
            f"{what}: row {row}: the golden next token {theirs[row, 0]} is not among the backend's top {k}"
        )
    overlap = np.mean([len(set(a) & set(b)) / k for a, b in zip(mine.tolist(), theirs.tolist(), strict=True)])
    assert overlap >= bound.top_k_overlap, (
        f"{what}: the top-{k} tokens overlap the goldens' by {overlap:.2f} on average, below {bound.top_k_overlap}"
    )


def assert_consistent(a: npt.NDArray[np.floating], b: npt.NDArray[np.floating], model: Any, what: str) -> None:
    """Assert that two computations of the same logits agree within the model's declared ``logits_atol``.

    This is the backend's self-consistency (prefill against decode, chunked against whole,
    batched against alone), which it states itself; distance from the goldens is :func:`grade_logits`.
    """
    tolerance = max(model.logits_atol, 1e-7)
    diff = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))
    assert diff <= tolerance, f"{what}: logits differ by {diff:g}, more than the declared logits_atol {tolerance:g}"
