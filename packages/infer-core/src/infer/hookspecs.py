# mypy: disable-error-code="empty-body"
"""The backend contract: the hooks a backend plugin implements.

A backend is a module or object registered under the entry-point group ``infer.backends``::

    [project.entry-points."infer.backends"]
    mybackend = "infer_backend_mine.plugin"

It implements :func:`infer_backend_info` and :func:`infer_load`, and :func:`infer_prefill` /
:func:`infer_decode` for the handles it returns (contract 1.1 adds optional
:func:`infer_truncate`, :func:`infer_fork` and :func:`infer_prefill_all`, each behind a declared
capability; contract 1.2 lets a device sampler declare that it honours token masks; contract 1.3
adds optional :func:`infer_draft`, cheap approximate decode steps for drafting). The core
routes prefill, decode and sample calls for a model only to the backend that loaded it (plus
any ``wrapper=True`` hookimpls, which see every backend's calls: use them for timing, tracing
or fault injection).

Mark implementations with :data:`infer.hookimpl`. Import heavy runtimes (onnxruntime,
coremltools...) inside :func:`infer_load`, never at module import: discovery imports every
installed backend and must stay fast.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from infer.markers import hookimpl, hookspec

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from infer.contract import BackendInfo, Batch, KVCache, LoadSpec, ModelHandle

    # The parameter and state types only: the default sampler (infer.sampling.chain) implements
    # these hooks and is no part of the contract.
    from infer.sampling.params import SamplingParams
    from infer.sampling.state import SamplerState

# The markers live in infer.markers (see there why); this module hands them on, as ever.
__all__ = ["hookimpl", "hookspec"]


@hookspec
def infer_backend_info() -> BackendInfo:
    """Describe the backend: name, version, contract version, devices, dtypes, capabilities.

    Called once per process at discovery, for every installed backend. It must be cheap and
    must not import the backend's runtime. A backend that cannot run on this machine still
    answers, with :attr:`BackendInfo.unavailable_reason` saying why.

    Every backend implements it; wrappers should not.
    """


@hookspec(firstresult=True)
def infer_load(spec: LoadSpec, options: Mapping[str, Any]) -> ModelHandle | None:
    """Load the model ``spec`` describes and return a handle, or ``None`` to decline.

    Only the backend named by ``spec.backend`` is asked. Return ``None`` when the reference is
    not something this backend can open (the core then reports that no backend could load it);
    raise a typed :mod:`infer.errors` error when it is, but is broken. ``options`` holds the
    backend-specific keyword arguments the user passed to :func:`infer.load`; reject unknown
    keys with :class:`infer.errors.InvalidParameterError`.

    Stops at the first non-None result.
    """


@hookspec(firstresult=True)
def infer_prefill(model: ModelHandle, batch: Batch) -> npt.NDArray[np.float32]:
    """Feed each row's tokens to its cache; return the last token's logits, ``[B, vocab]`` float32.

    Rows may have different lengths. The core splits long prompts into chunks and calls this
    once per chunk, so a row's cache may already hold earlier chunks: positions continue from
    ``batch.sequences[i].length``. The core never passes more rows than ``max_batch_size``, nor
    more tokens than a cache's capacity.

    Called only for handles this backend returned (and on every wrapper). Stops at the first
    non-None result.
    """


@hookspec(firstresult=True)
def infer_decode(model: ModelHandle, batch: Batch) -> npt.NDArray[np.float32]:
    """Feed exactly one token per row; return the next-token logits, ``[B, vocab]`` float32.

    Each row's cache grows by one. The result must equal what :func:`infer_prefill` of the same
    token would give, within the backend's declared ``logits_atol``.

    Called only for handles this backend returned (and on every wrapper). Stops at the first
    non-None result.
    """


@hookspec(firstresult=True)
def infer_sample(
    logits: npt.NDArray[np.float32],
    params: Sequence[SamplingParams],
    states: Sequence[SamplerState],
) -> npt.NDArray[np.int64]:
    """Choose one token per row of ``logits`` (``[B, vocab]``); return them as int64 ``[B]``.

    ``params[i]`` and ``states[i]`` belong to row ``i``: ``states[i]`` holds the row's seeded
    random generator and the tokens seen so far (for penalties). Implementations must draw
    randomness only from ``states[i].rng`` so that a seed gives the same tokens whatever else
    runs in the batch.

    ``states[i].token_mask``, when not ``None``, is a bool ``[vocab]`` row set by a plugin for
    this draw (structured output): only tokens where it is ``True`` may be chosen, and the mask
    applies before penalties, top-k and top-p (the allowed tokens keep their relative
    probabilities). The default sampler honours it. A backend that samples on its device
    receives such rows only when it declares :attr:`Capability.TOKEN_MASK` (contract 1.2) and
    must then honour the mask; without it the engine draws constrained rows on the host chain.

    infer-core ships the default sampler as a ``trylast`` implementation. A backend may sample
    on its device for its own models (declare :attr:`Capability.DEVICE_SAMPLING`); a plugin may
    wrap it (``wrapper=True``) to constrain or trace choices. Stops at the first non-None result.
    """


# -- contract 1.1: optional KV capabilities ---------------------------------------------------
# A backend implements each of these only when it declares the matching capability in
# infer_backend_info; the core never calls them otherwise, so a 1.0 backend needs none.


@hookspec(firstresult=True)
def infer_truncate(model: ModelHandle, sequence: KVCache, length: int) -> bool | None:
    """Roll ``sequence`` back to its first ``length`` tokens; return ``True`` once done.

    Afterwards the cache must behave exactly as if only those ``length`` tokens had ever been
    fed: the next prefill or decode continues at position ``length``. The core passes
    ``0 <= length <= sequence.length``. Used to drop rejected speculative tokens.

    Implement it when declaring :attr:`infer.Capability.TRUNCATE` (contract 1.1). Called only
    for handles this backend returned. Stops at the first non-None result.
    """


@hookspec(firstresult=True)
def infer_fork(model: ModelHandle, sequence: KVCache, length: int, capacity: int) -> KVCache | None:
    """Return a new cache, able to hold ``capacity`` tokens, holding ``sequence``'s first ``length`` tokens.

    The new cache must give the same logits as one filled by prefilling those tokens, and be
    independent of ``sequence``: appending to, truncating or releasing either leaves the other
    unchanged (a backend may share the prefix's memory as long as that holds). The core passes
    ``1 <= length <= sequence.length`` and ``length <= capacity``. Used by prefix caching.

    Implement it when declaring :attr:`infer.Capability.FORK` (contract 1.1). Called only for
    handles this backend returned. Stops at the first non-None result.
    """


@hookspec(firstresult=True)
def infer_prefill_all(model: ModelHandle, batch: Batch) -> npt.NDArray[np.float32] | None:
    """Like :func:`infer_prefill`, but return the logits of every fed position.

    The result is float32 ``[sum of the rows' token counts, vocab]``: row 0's positions first,
    then row 1's, each in order. Position ``j`` of a row must equal what a decode of that token
    would give after the ones before it, within ``logits_atol``. Used to verify speculative
    tokens in one step.

    Implement it when declaring :attr:`infer.Capability.ALL_LOGITS` (contract 1.1). Called only
    for handles this backend returned (and on every wrapper). Stops at the first non-None result.
    """


# -- contract 1.3: draft steps ----------------------------------------------------------------


@hookspec(firstresult=True)
def infer_draft(model: ModelHandle, batch: Batch) -> npt.NDArray[np.float32] | None:
    """Like :func:`infer_decode` (one token per row, next-token logits ``[B, vocab]``), through a
    cheaper approximation of the same model, e.g. its weights quantized further.

    It advances each row's cache by one position, as decode does, but what it writes there is
    approximate: the core truncates the drafted positions away and feeds them again through
    :func:`infer_prefill_all` before any of them counts, so after that verification the cache
    must be exactly what it would have been without the draft steps. Used to draft speculative
    tokens cheaply; the logits only choose which tokens to propose, never which are emitted.

    Implement it when declaring :attr:`infer.Capability.DRAFT` (contract 1.3), together with
    ``TRUNCATE`` and ``ALL_LOGITS``. Called only for handles this backend returned. Stops at the
    first non-None result.
    """
