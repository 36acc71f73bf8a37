"""The data that crosses the backend contract.

A backend receives a :class:`LoadSpec` and returns a :class:`ModelHandle`; the core then
drives it with :class:`Batch` objects, one row per sequence, each row owning a backend-made
:class:`KVCache`. The KV cache is opaque to the core except for its length, its capacity,
its size in bytes and its release.

Contract 1.1 adds three optional capabilities, each a hook a backend implements only when it
declares the matching :class:`Capability` (a 1.0 backend declares none and keeps working):
:attr:`Capability.TRUNCATE` (``infer_truncate``: roll a cache back), :attr:`Capability.FORK`
(``infer_fork``: a new cache starting with another's first tokens) and
:attr:`Capability.ALL_LOGITS` (``infer_prefill_all``: a prefill returning every position's
logits). The engine builds prefix caching and speculative decoding on them.

Contract 1.2 adds :attr:`Capability.TOKEN_MASK`: a backend that samples on its device
(:attr:`Capability.DEVICE_SAMPLING`) declares it when its ``infer_sample`` honours
``SamplerState.token_mask``. Without it the engine never hands a constrained row (structured
output) to the backend's sampler: those rows are drawn by the core's host sampling chain, the
others still on the device, so a 1.0 or 1.1 device sampler keeps working and constrained output
stays correct on it.

Contract 1.3 adds :attr:`Capability.DRAFT` (``infer_draft``): a decode step through a cheaper
approximation of the same model (its weights quantized further) on the same caches. The engine
drafts speculative tokens with it; every position a draft step writes is overwritten by the
all-position verification step that follows, so the approximation never reaches the output.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, final

import numpy as np
import numpy.typing as npt

from infer.errors import BackendError

if TYPE_CHECKING:
    import tokenizers

    from infer.bundle import Bundle

__all__ = [
    "CONTRACT_VERSION",
    "BackendInfo",
    "Batch",
    "Capability",
    "KV_CAPABILITIES",
    "MASK_CAPABILITIES",
    "DRAFT_CAPABILITIES",
    "KVCache",
    "LoadSpec",
    "ModelHandle",
    "contract_compatible",
    "usable_capabilities",
]

#: The version of the backend contract this infer-core speaks. A backend declares the version it
#: implements in :attr:`BackendInfo.contract_version`; a different major is refused.
CONTRACT_VERSION: Final = "1.3"


def contract_compatible(declared: str, core: str = CONTRACT_VERSION) -> bool:
    """Whether a backend built for contract ``declared`` can run on contract ``core``."""
    return declared.split(".", 1)[0] == core.split(".", 1)[0]


def usable_capabilities(info: BackendInfo, handle: ModelHandle | None = None) -> frozenset[Capability]:
    """The capabilities the core may use on ``handle``: those declared, narrowed by the handle's
    own :attr:`ModelHandle.capabilities`; a backend built for an older minor gets none of the
    capabilities added after it (1.0: none of 1.1's; 1.1: not 1.2's token masks; 1.2: not 1.3's
    draft steps)."""
    major, _, minor = info.contract_version.partition(".")
    declared = info.capabilities
    version = (int(major), int(minor) if minor.isdigit() else 0)
    if version < (1, 1):
        declared -= KV_CAPABILITIES
    if version < (1, 2):
        declared -= MASK_CAPABILITIES
    if version < (1, 3):
        declared -= DRAFT_CAPABILITIES
    if handle is not None and handle.capabilities is not None:
        declared &= handle.capabilities
    return declared


class Capability(str, enum.Enum):
    """Flags a backend declares; the conformance suite reads them to decide what to test."""

    #: prefill/decode accept batches of several sequences with different lengths.
    BATCH = "batch"
    #: identical inputs give bit-identical logits (greedy determinism is then exact).
    DETERMINISTIC = "deterministic"
    #: the backend implements ``infer_sample`` itself for its own models.
    DEVICE_SAMPLING = "device_sampling"
    #: load options inject faults (latency, hangs, errors, corrupted cache).
    FAULT_INJECTION = "fault_injection"
    #: the logits are made up, not computed from the model's weights (a test double such as the
    #: fake): the conformance suite reports the golden and reference checks as skipped for it.
    SYNTHETIC = "synthetic"
    #: ``infer_truncate`` rolls a cache back to its first n tokens (contract 1.1).
    TRUNCATE = "truncate"
    #: ``infer_fork`` makes a new cache holding another's first n tokens (contract 1.1).
    FORK = "fork"
    #: ``infer_prefill_all`` returns the logits of every position of a chunk (contract 1.1).
    ALL_LOGITS = "all_logits"
    #: the backend's ``infer_sample`` (:attr:`DEVICE_SAMPLING`) honours ``SamplerState.token_mask``,
    #: so constrained rows may be sampled on its device (contract 1.2).
    TOKEN_MASK = "token_mask"
    #: ``infer_draft`` decodes through a cheaper approximation of the model on the same caches,
    #: for drafting speculative tokens (contract 1.3).
    DRAFT = "draft"


#: The capabilities added in contract 1.1, which a backend built for 1.0 cannot declare.
KV_CAPABILITIES: Final = frozenset({Capability.TRUNCATE, Capability.FORK, Capability.ALL_LOGITS})
#: The capability added in contract 1.2, which a backend built for 1.0 or 1.1 cannot declare.
MASK_CAPABILITIES: Final = frozenset({Capability.TOKEN_MASK})
#: The capability added in contract 1.3, which a backend built for an earlier minor cannot declare.
DRAFT_CAPABILITIES: Final = frozenset({Capability.DRAFT})


@final
@dataclass(frozen=True, slots=True)
class BackendInfo:
    """What a backend declares about itself through ``infer_backend_info``."""

    #: Backend name users pass as ``backend=``; equals the entry-point name by convention.
    name: str
    #: Version of the distribution providing the backend.
    version: str
    #: Contract version implemented, e.g. ``"1.0"``.
    contract_version: str
    #: Devices the backend can target, most preferred first (``"cpu"``, ``"cuda"``, ``"ane"``...).
    devices: tuple[str, ...] = ("cpu",)
    #: Compute precisions offered, default first (``"fp32"``, ``"fp16"``, ``"int4"``...).
    dtypes: tuple[str, ...] = ("fp32",)
    #: Capability flags, see :class:`Capability`.
    capabilities: frozenset[Capability] = frozenset()
    #: Largest batch a single prefill/decode call accepts; the core splits larger batches.
    max_batch_size: int = 1
    #: Max absolute logit difference the backend guarantees between equivalent computations
    #: (prefill vs prefill+decode, batched vs single) at its default precision.
    logits_atol: float = 1e-4
    #: Rank used to pick a default backend when the user names none; higher wins.
    priority: int = 0
    #: ``None`` when the backend can run here, else why it cannot and what to use instead.
    unavailable_reason: str | None = None

    @property
    def available(self) -> bool:
        """Whether the backend can run on this machine."""
        return self.unavailable_reason is None


@final
@dataclass(frozen=True, slots=True)
class LoadSpec:
    """What the core asks a backend to load."""

    #: The backend the user (or the core's default choice) asked for; only it should answer.
    backend: str
    #: The model reference exactly as the user gave it.
    ref: str
    #: The reference resolved to a local file or folder, or ``None`` for refs that name no path.
    path: Path | None
    #: The Hugging Face-layout bundle at ``path``, when it is one (GGUF files arrive converted).
    bundle: Bundle | None
    #: Requested device, or ``None`` for the backend's default.
    device: str | None = None
    #: Requested precision, or ``None`` for the backend's default.
    dtype: str | None = None
    #: Largest context the caller will use; backends size KV buffers from requests, not from this.
    context_length: int | None = None


class KVCache(abc.ABC):
    """One sequence's key/value cache, owned by the backend that made it.

    Invariants the conformance suite checks: the cache only grows (append-only), by exactly
    the number of tokens fed to it; :meth:`release` frees its memory and is idempotent.
    """

    __slots__ = ()

    @property
    @abc.abstractmethod
    def length(self) -> int:
        """Number of tokens whose keys and values are cached."""

    @property
    @abc.abstractmethod
    def capacity(self) -> int:
        """Most tokens this cache can hold."""

    @property
    @abc.abstractmethod
    def nbytes(self) -> int:
        """Bytes of memory the cache holds now (0 once released)."""

    @property
    @abc.abstractmethod
    def released(self) -> bool:
        """Whether :meth:`release` has been called."""

    @abc.abstractmethod
    def release(self) -> None:
        """Free the cache's memory. Safe to call more than once."""


@final
@dataclass(frozen=True, slots=True)
class Batch:
    """One backend step over several sequences.

    Row ``i`` feeds ``tokens[i]`` (int32, 1-D, at least one token) to ``sequences[i]``; rows may
    differ in length during prefill, and have exactly one token each during decode. The backend
    appends the tokens to each row's cache and returns the logits of each row's last token.
    """

    sequences: tuple[KVCache, ...]
    tokens: tuple[npt.NDArray[np.int32], ...]

    def __post_init__(self) -> None:
        if len(self.sequences) != len(self.tokens):
            raise ValueError("a batch needs exactly one token array per sequence")

    @property
    def size(self) -> int:
        """Number of rows."""
        return len(self.sequences)

    def rows(self, start: int, stop: int) -> Batch:
        """The sub-batch of rows ``start:stop`` (used to split batches over ``max_batch_size``)."""
        return Batch(self.sequences[start:stop], self.tokens[start:stop])


class ModelHandle(abc.ABC):
    """A model loaded by a backend: what ``infer_load`` returns.

    The core reads the attributes below, creates one :class:`KVCache` per request through
    :meth:`new_sequence`, and passes the handle back to the backend's prefill and decode hooks.
    Text-side attributes may stay ``None`` when the model came from a bundle: the core then
    takes the tokenizer, chat template and stop ids from the bundle.
    """

    #: Name of the backend that made this handle (routes prefill/decode back to it).
    backend: str
    #: Number of logits per row.
    vocab_size: int
    #: Most tokens a sequence may hold (prompt plus generated).
    context_length: int
    #: Device the model runs on.
    device: str = "cpu"
    #: Precision the model computes in.
    dtype: str = "fp32"
    #: Tokenizer for models that carry their own (``None``: the core uses the bundle's).
    tokenizer: tokenizers.Tokenizer | None = None
    #: Token ids that end generation (``None``: the core uses the bundle's).
    eos_token_ids: tuple[int, ...] | None = None
    #: Jinja chat template (``None``: the core uses the bundle's, if any).
    chat_template: str | None = None
    #: Tolerance of this loaded model when it differs from :attr:`BackendInfo.logits_atol`
    #: (a quantized precision, say); ``None`` means the backend's declared one.
    logits_atol: float | None = None
    #: Backend-specific facts worth showing (cache paths, providers, thread counts...).
    details: Mapping[str, Any] = MappingProxyType({})
    #: The capabilities this loaded model has when fewer than the backend declares (a model
    #: format that cannot truncate, say); ``None`` means all the declared ones.
    capabilities: frozenset[Capability] | None = None

    @abc.abstractmethod
    def new_sequence(self, capacity: int) -> KVCache:
        """Make an empty cache able to hold ``capacity`` tokens (at most ``context_length``)."""

    def close(self) -> None:  # noqa: B027 - optional hook for backends holding resources
        """Free the model's resources. The core calls it once; the default does nothing."""


_FLOAT32: Final = np.dtype(np.float32)


def check_logits(logits: object, rows: int, vocab_size: int, backend: str) -> npt.NDArray[np.float32]:
    """Validate what a backend returned for a step: float32 ``[rows, vocab_size]``."""
    if type(logits) is np.ndarray and logits.dtype is _FLOAT32 and logits.shape == (rows, vocab_size):
        return logits  # the per-step case, checked in one line
    if not isinstance(logits, np.ndarray):
        raise BackendError(f"backend {backend!r} returned {type(logits).__name__}, not a numpy array", backend=backend)
    if logits.shape != (rows, vocab_size):
        raise BackendError(
            f"backend {backend!r} returned logits of shape {logits.shape}, expected {(rows, vocab_size)}",
            backend=backend,
        )
    if logits.dtype != np.float32:
        raise BackendError(f"backend {backend!r} returned {logits.dtype} logits, expected float32", backend=backend)
    return logits


def check_all_logits(
    logits: object, lengths: Sequence[int], vocab_size: int, backend: str
) -> tuple[npt.NDArray[np.float32], ...]:
    """Validate what ``infer_prefill_all`` returned; split it into one ``[n_i, vocab]`` array per row."""
    offsets = np.cumsum(lengths)
    whole = check_logits(logits, int(offsets[-1]) if len(lengths) else 0, vocab_size, backend)
    return tuple(np.split(whole, offsets[:-1]))


def token_rows(rows: Sequence[npt.ArrayLike]) -> tuple[npt.NDArray[np.int32], ...]:
    """Normalise per-row token ids to the contiguous int32 arrays a :class:`Batch` carries."""
    return tuple(np.ascontiguousarray(r, dtype=np.int32).reshape(-1) for r in rows)
