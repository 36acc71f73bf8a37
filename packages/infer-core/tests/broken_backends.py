"""Deliberately broken backends: the conformance suite must fail on each, in a named test.

Each is a small change to the fake (made-up logits) or to the numpy example backend (real
weights), one defect apiece. Load one into a suite run with
``--infer-plugin broken_backends:NAME --infer-backend broken-...``.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import replace
from typing import Any

import numpy as np

import infer
from infer.sampling import sample
from infer_backend_fake import FakeKV, FakeModel
from infer_backend_fake import plugin as fake
from infer_backend_numpy import NumpyModel
from infer_backend_numpy import plugin as numpy_backend
from infer_conformance.reference import ReferenceModel

Cap = infer.Capability


class StepCounter:
    """Counts the model steps a generation takes, by kind: decode, draft and verify (wrappers)."""

    def __init__(self) -> None:
        self.steps: Counter[str] = Counter()

    @infer.hookimpl(wrapper=True)
    def infer_decode(self, model: Any, batch: Any) -> Any:
        self.steps["decode"] += 1
        return (yield)

    @infer.hookimpl(wrapper=True)
    def infer_draft(self, model: Any, batch: Any) -> Any:
        self.steps["draft"] += 1
        return (yield)

    @infer.hookimpl(wrapper=True)
    def infer_prefill_all(self, model: Any, batch: Any) -> Any:
        self.steps["verify"] += 1
        return (yield)


class _Broken:
    """A backend plugin serving ``model_class`` (a broken fake or numpy model) under ``name``.

    ``info`` holds changes to the base backend's declaration (capabilities added, a looser
    tolerance, other dtypes...).
    """

    def __init__(self, name: str, model_class: type[Any], **info: Any) -> None:
        self.name = name
        self.model_class = model_class
        self.base = numpy_backend if issubclass(model_class, NumpyModel) else fake
        self.info = info

    @infer.hookimpl
    def infer_backend_info(self) -> infer.BackendInfo:
        declared = replace(self.base.infer_backend_info(), name=self.name)
        extra = self.info.get("add_capabilities", frozenset())
        gone = self.info.get("remove_capabilities", frozenset())
        changes = {k: v for k, v in self.info.items() if k not in ("add_capabilities", "remove_capabilities")}
        return replace(declared, capabilities=(declared.capabilities | extra) - gone, **changes)

    @infer.hookimpl
    def infer_load(self, spec: infer.LoadSpec, options: Mapping[str, Any]) -> Any:
        if spec.backend != self.name:
            return None
        return self.model_class.from_spec(replace(spec, backend=self.base.NAME), options)

    @infer.hookimpl
    def infer_prefill(self, model: infer.ModelHandle, batch: infer.Batch) -> Any:
        return model.forward(batch) if isinstance(model, self.model_class) else None

    @infer.hookimpl
    def infer_decode(self, model: infer.ModelHandle, batch: infer.Batch) -> Any:
        if not isinstance(model, self.model_class):
            return None
        return model.decode_step(batch) if hasattr(model, "decode_step") else model.forward(batch)

    @infer.hookimpl
    def infer_prefill_all(self, model: infer.ModelHandle, batch: infer.Batch) -> Any:
        return model.forward_all(batch) if isinstance(model, self.model_class) else None

    @infer.hookimpl
    def infer_draft(self, model: infer.ModelHandle, batch: infer.Batch) -> Any:
        return model.draft(batch) if isinstance(model, self.model_class) and hasattr(model, "draft") else None

    @infer.hookimpl
    def infer_truncate(self, model: infer.ModelHandle, sequence: infer.KVCache, length: int) -> Any:
        return model.truncate(sequence, length) if isinstance(model, self.model_class) else None

    @infer.hookimpl
    def infer_fork(self, model: infer.ModelHandle, sequence: infer.KVCache, length: int, capacity: int) -> Any:
        return model.fork(sequence, length, capacity) if isinstance(model, self.model_class) else None


def variant(name: str, model_class: type[Any], **info: Any) -> _Broken:
    """A backend serving ``model_class`` under ``name`` with ``info`` changed (``add_capabilities``,
    ``remove_capabilities``, ``contract_version``...): for tests that need a well-behaved variant."""
    return _Broken(name, model_class, **info)


@contextlib.contextmanager
def loaded_variant(
    name: str, model_class: type[Any], *, load: Mapping[str, Any] | None = None, **info: Any
) -> Iterator[Any]:
    """A model loaded on :func:`variant` ``(name, model_class, **info)``, registered for the block
    and closed and unregistered after it; ``load``: :func:`infer.load`'s keyword arguments."""
    from infer.plugins import get_registry

    registry = get_registry()
    backend = registry.register_backend(variant(name, model_class, **info), name=name)
    try:
        model = infer.load("fake", backend=name, **(load or {}))
        try:
            yield model
        finally:
            model.close()
    finally:
        registry.unregister(backend.plugin)


# -- wrong model maths (numpy backend: real weights) ---------------------------------------------


class _WithForward(NumpyModel):
    forward_class: type[ReferenceModel] = ReferenceModel

    def __init__(self, bundle: Any, context_length: int | None) -> None:
        super().__init__(bundle, context_length)
        self.reference = self.forward_class(bundle)


class _InterleavedRope(ReferenceModel):
    def _rope(self, positions: Any) -> Any:
        # frequencies laid out for interleaved pairs (0,1), (2,3)... but rotated as halves
        angles = positions[:, None].astype(np.float64) * self._inv_freq[None, :]
        angles = np.repeat(angles, 2, axis=-1)
        return np.cos(angles), np.sin(angles)


class _RopeInterleaved(_WithForward):
    forward_class = _InterleavedRope


class _TiledKVHeads(ReferenceModel):
    """Query head ``h`` reads key/value head ``h % kv_heads`` instead of ``h // group``.

    Emulated by reordering the query heads (rows of q_proj, columns of o_proj) so that the
    reference's correct mapping computes what a tiling backend computes.
    """

    def __init__(self, bundle: Any) -> None:
        super().__init__(bundle)
        s = self.spec
        heads, kv, d = s.num_attention_heads, s.num_key_value_heads, s.head_dim
        group = heads // kv
        slot = [(h % kv) * group + h // kv for h in range(heads)]
        order = np.argsort(slot)  # the head that lands in each slot
        for n in range(s.num_hidden_layers):
            p = f"model.layers.{n}.self_attn."
            q = self.weights[p + "q_proj.weight"].reshape(heads, d, -1)
            self.weights[p + "q_proj.weight"] = q[order].reshape(heads * d, -1)
            o = self.weights[p + "o_proj.weight"].reshape(-1, heads, d)
            self.weights[p + "o_proj.weight"] = o[:, order].reshape(-1, heads * d)


class _GqaTiled(_WithForward):
    forward_class = _TiledKVHeads


class _SaturatingPositions(ReferenceModel):
    def _rope(self, positions: Any) -> Any:
        return super()._rope(np.minimum(positions, 127))  # a rotary table of 128 rows, clamped


class _PositionsSaturate(_WithForward):
    forward_class = _SaturatingPositions


class _OffByAHundredth(NumpyModel):
    def forward(self, batch: infer.Batch) -> Any:
        return super().forward(batch) + np.float32(0.01)  # hidden behind a declared tolerance of 1.0


# -- KV cache ------------------------------------------------------------------------------------


class _KVNotAppended(FakeModel):
    def decode_step(self, batch: infer.Batch) -> Any:
        # answers from the cache as it is, without recording the new token
        return self.table[[kv._hash % 97 for kv in batch.sequences]]


class _PerturbedLogits(FakeModel):
    def decode_step(self, batch: infer.Batch) -> Any:
        return self.forward(batch) + np.float32(1e-3)


class _WrongVocab(FakeModel):
    def forward(self, batch: infer.Batch) -> Any:
        logits = super().forward(batch)
        return np.concatenate([logits, logits[:, :1]], axis=1)


class _WindowKV(FakeKV):
    """Keeps only the last 128 tokens: logits depend on a window, as with a cache that wraps."""

    def append(self, ids: Any) -> int:
        super().append(ids)
        h = 1469598103934665603
        for token in self._tokens[max(0, self._length - 128) : self._length].tolist():  # type: ignore[index]
            h = ((h ^ (token + 1)) * 1099511628211) & ((1 << 64) - 1)
        return h


class _KVWrapsAt128(FakeModel):
    def new_sequence(self, capacity: int) -> FakeKV:
        return _WindowKV(min(capacity, self.context_length))


class _NbytesKeptKV(FakeKV):
    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self.reported = 4 * capacity

    @property
    def nbytes(self) -> int:
        return self.reported  # still reports its buffer after release


class _ReleaseKeepsNbytes(FakeModel):
    def new_sequence(self, capacity: int) -> FakeKV:
        return _NbytesKeptKV(min(capacity, self.context_length))


class _CapacityShort(FakeModel):
    def new_sequence(self, capacity: int) -> FakeKV:
        return FakeKV(max(1, min(capacity, self.context_length) // 2))


# -- contract 1.1 KV capabilities ---------------------------------------------------------------


class _TruncateKeepsHash(FakeModel):
    def truncate(self, kv: Any, length: int) -> bool:
        kv._length = length  # the length goes back, the dropped tokens still shape the logits
        return True


class _LastStepKV(FakeKV):
    """Remembers its hash before the last step and truncates back to it, whatever length is asked."""

    before = FakeKV(0)._hash

    def append(self, ids: Any) -> int:
        self.before = self._hash
        return super().append(ids)

    def truncate(self, length: int) -> None:
        self._length, self._hash = length, self.before


class _TruncateUndoesLastStep(FakeModel):
    def new_sequence(self, capacity: int) -> FakeKV:
        return _LastStepKV(min(capacity, self.context_length))


class _ForkKeepsWholeHash(FakeModel):
    def fork(self, kv: Any, length: int, capacity: int) -> FakeKV:
        forked = super().fork(kv, length, capacity)
        forked._hash = kv._hash  # the right length, but the logits of the whole source
        return forked


class _SharedKV(FakeKV):
    """A fork that releases its source with itself: the two share one buffer and one lifetime."""

    def __init__(self, source: FakeKV, capacity: int) -> None:
        super().__init__(capacity)
        self.source = source

    def release(self) -> None:
        super().release()
        self.source.release()


class _ForkSharesLifetime(FakeModel):
    def fork(self, kv: Any, length: int, capacity: int) -> FakeKV:
        forked = _SharedKV(kv, capacity)
        forked.append(kv._tokens[:length])
        return forked


class _ForkOneShort(FakeModel):
    def fork(self, kv: Any, length: int, capacity: int) -> FakeKV:
        forked = super().fork(kv, length - 1, capacity)
        forked._length = length  # says it holds the prefix, lost its last token
        return forked


class _AllLogitsShifted(FakeModel):
    def forward_all(self, batch: infer.Batch) -> Any:
        # each position gets the logits of the one before it: the off-by-one of verification
        before = [self.table[kv._hash % 97][None] for kv in batch.sequences]
        logits = super().forward_all(batch)
        return np.concatenate([before[0], logits[:-1]]) if len(before) == 1 else logits


class _AllLogitsRowsReversed(FakeModel):
    def forward_all(self, batch: infer.Batch) -> Any:
        parts = [super(_AllLogitsRowsReversed, self).forward_all(batch.rows(i, i + 1)) for i in range(batch.size)]
        return np.concatenate(parts[::-1])  # rows in the wrong order: sizes still add up


# -- determinism, batching -----------------------------------------------------------------------


class _UlpJitter(FakeModel):
    def forward(self, batch: infer.Batch) -> Any:
        logits = super().forward(batch)
        # every other step, one ulp off: invisible to tolerances, not bit-identical
        return np.nextafter(logits, np.float32(np.inf)) if self.steps % 2 else logits


class _BatchCrosstalk(FakeModel):
    def forward(self, batch: infer.Batch) -> Any:
        logits = super().forward(batch)
        if len(logits) > 1:
            logits[1:] += np.float32(1e-3) * logits[0]  # rows leak into each other
        return logits


# -- sampling ------------------------------------------------------------------------------------


class _DeviceSampler(_Broken):
    """Declares DEVICE_SAMPLING and samples with the reference sampler on altered parameters."""

    def __init__(self, name: str, alter: Any) -> None:
        super().__init__(name, FakeModel, add_capabilities=frozenset({Cap.DEVICE_SAMPLING}))
        self.alter = alter

    @infer.hookimpl
    def infer_sample(self, logits: Any, params: Any, states: Any) -> Any:
        return sample(logits, [self.alter(p) for p in params], states)


class _MaskIgnored(_Broken):
    """Declares DEVICE_SAMPLING and TOKEN_MASK, but samples as if no token were masked."""

    def __init__(self, name: str) -> None:
        super().__init__(name, FakeModel, add_capabilities=frozenset({Cap.DEVICE_SAMPLING, Cap.TOKEN_MASK}))

    @infer.hookimpl
    def infer_sample(self, logits: Any, params: Any, states: Any) -> Any:
        masks = [s.token_mask for s in states]
        for state in states:
            state.token_mask = None
        try:
            return sample(logits, params, states)
        finally:
            for state, mask in zip(states, masks, strict=True):
                state.token_mask = mask


class _SeedIgnored(_Broken):
    @infer.hookimpl
    def infer_sample(self, logits: Any, params: Any, states: Any) -> Any:
        rng = np.random.default_rng()  # a fresh, unseeded generator: the request's seed is ignored
        out = np.empty(len(params), dtype=np.int64)
        for i, p in enumerate(params):
            row = logits[i].astype(np.float64)
            if p.temperature == 0:
                out[i] = int(np.argmax(row))
            else:
                probs = np.exp((row - row.max()) / p.temperature)
                out[i] = int(rng.choice(len(row), p=probs / probs.sum()))
        return out


# -- load ----------------------------------------------------------------------------------------


class _ClaimsEverything(_Broken):
    @infer.hookimpl
    def infer_load(self, spec: infer.LoadSpec, options: Mapping[str, Any]) -> Any:
        if spec.backend != self.name:
            return None
        if spec.bundle is None:
            return FakeModel(fake.FakeOptions(), tokenizer=True)  # whatever it was asked to open
        return FakeModel.from_spec(replace(spec, backend=fake.NAME), options)


class _IgnoresDtype(FakeModel):
    @classmethod
    def from_spec(cls, spec: infer.LoadSpec, options: Mapping[str, Any]) -> FakeModel | None:
        return super().from_spec(replace(spec, dtype=None), options)


class _IgnoresDevice(FakeModel):
    @classmethod
    def from_spec(cls, spec: infer.LoadSpec, options: Mapping[str, Any]) -> FakeModel | None:
        return super().from_spec(replace(spec, device=None), options)


class _WrongEos(FakeModel):
    @classmethod
    def from_spec(cls, spec: infer.LoadSpec, options: Mapping[str, Any]) -> FakeModel | None:
        model = super().from_spec(spec, options)
        if model is not None:
            model.eos_token_ids = (0,)
        return model


class _ShortContext(FakeModel):
    @classmethod
    def from_spec(cls, spec: infer.LoadSpec, options: Mapping[str, Any]) -> FakeModel | None:
        model = super().from_spec(spec, options)
        if model is not None and spec.context_length is None:
            model.context_length //= 2  # reports half the bundle's context
        return model


# -- resources and concurrency -------------------------------------------------------------------

_GRAVEYARD: list[Any] = []


class _LeakingKV(FakeKV):
    __slots__ = ("_ballast",)

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._ballast: Any = np.ones(1 << 20, np.float64)  # 8 MiB of real, touched pages

    @property
    def nbytes(self) -> int:
        return 0 if self.released else super().nbytes + self._ballast.nbytes

    def release(self) -> None:
        if self._ballast is not None:
            _GRAVEYARD.append(self._ballast)  # "freed", but still referenced
        self._ballast = None
        super().release()


class _ReleaseLeaks(FakeModel):
    def new_sequence(self, capacity: int) -> FakeKV:
        return _LeakingKV(min(capacity, self.context_length))


class _AliasedLogits(FakeModel):
    def forward(self, batch: infer.Batch) -> Any:
        logits = super().forward(batch)
        out = getattr(self, "_out", None)
        if out is None or out.shape[0] < len(logits):
            out = self._out = np.empty((64, self.vocab_size), np.float32)
        out[: len(logits)] = logits
        return out[: len(logits)]  # a view of a buffer the next step overwrites


_SCRATCH = np.empty((64, 1 << 16), np.float32)  # one buffer for every model: races across threads


class _SharedScratch(FakeModel):
    def forward(self, batch: infer.Batch) -> Any:
        logits = super().forward(batch)
        rows, vocab = logits.shape
        _SCRATCH[:rows, :vocab] = logits
        time.sleep(0.0005)  # the other model's thread writes meanwhile
        return _SCRATCH[:rows, :vocab].copy()


class _HangsAtStep3(FakeModel):
    def forward(self, batch: infer.Batch) -> Any:
        if self.steps == 2:  # the third step never returns (until the model is closed)
            self.steps += 1
            self._unhang.wait(30)
        return super().forward(batch)


class _LeakyCancelKV(FakeKV):
    def release(self) -> None:
        pass  # ignores cancellation: the cache lives on after its request ended


class _CancellationIgnored(FakeModel):
    def new_sequence(self, capacity: int) -> FakeKV:
        return _LeakyCancelKV(min(capacity, self.context_length))


# -- the registry the teeth test runs --------------------------------------------------------

ROPE_INTERLEAVED = _Broken("broken-rope", _RopeInterleaved)
GQA_TILED = _Broken("broken-gqa", _GqaTiled)
POSITIONS_SATURATE = _Broken("broken-positions", _PositionsSaturate)
TOLERANCE_ABUSE = _Broken("broken-tolerance", _OffByAHundredth, logits_atol=1.0)
KV_NOT_APPENDED = _Broken("broken-kv", _KVNotAppended)
PERTURBED_LOGITS = _Broken("broken-logits", _PerturbedLogits)
WRONG_VOCAB = _Broken("broken-vocab", _WrongVocab)
KV_WRAPS_AT_128 = _Broken("broken-window", _KVWrapsAt128)
RELEASE_KEEPS_NBYTES = _Broken("broken-nbytes", _ReleaseKeepsNbytes)
CAPACITY_SHORT = _Broken("broken-capacity", _CapacityShort)
ULP_JITTER = _Broken("broken-determinism", _UlpJitter, logits_atol=1e-5)
BATCH_CROSSTALK = _Broken("broken-batch", _BatchCrosstalk, logits_atol=1e-6)
SAMPLER_IGNORES_TOP_P = _DeviceSampler("broken-top-p", lambda p: p.replace(top_p=1.0))
SAMPLER_IGNORES_PENALTIES = _DeviceSampler(
    "broken-penalties", lambda p: p.replace(repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0)
)
SAMPLER_IGNORES_LOGIT_BIAS = _DeviceSampler("broken-bias", lambda p: p.replace(logit_bias={}))
SAMPLER_IGNORES_TOKEN_MASK = _MaskIgnored("broken-mask")
SEED_IGNORED = _SeedIgnored("broken-seed", FakeModel)
CLAIMS_EVERYTHING = _ClaimsEverything("broken-claims", FakeModel)
IGNORES_DTYPE = _Broken("broken-dtype", _IgnoresDtype)
IGNORES_DEVICE = _Broken("broken-device", _IgnoresDevice)
UNLOADABLE_DTYPE = _Broken("broken-dtypes", FakeModel, dtypes=("fp32", "fp16"))
UNLOADABLE_DEVICE = _Broken("broken-devices", FakeModel, devices=("cpu", "cuda"))
WRONG_EOS = _Broken("broken-eos", _WrongEos)
SHORT_CONTEXT = _Broken("broken-context", _ShortContext)
RELEASE_LEAKS = _Broken("broken-leak", _ReleaseLeaks)
ALIASED_LOGITS = _Broken("broken-alias", _AliasedLogits)
SHARED_SCRATCH = _Broken("broken-scratch", _SharedScratch)
CANCELLATION_IGNORED = _Broken("broken-cancel", _CancellationIgnored)
HANGS = _Broken("broken-hang", _HangsAtStep3)
TRUNCATE_KEEPS_HASH = _Broken("broken-truncate", _TruncateKeepsHash)
TRUNCATE_UNDOES_LAST_STEP = _Broken("broken-truncate-step", _TruncateUndoesLastStep)
FORK_KEEPS_WHOLE_HASH = _Broken("broken-fork", _ForkKeepsWholeHash)
FORK_SHARES_LIFETIME = _Broken("broken-fork-lifetime", _ForkSharesLifetime)
FORK_ONE_SHORT = _Broken("broken-fork-short", _ForkOneShort)
ALL_LOGITS_SHIFTED = _Broken("broken-all-logits", _AllLogitsShifted)
ALL_LOGITS_ROWS_REVERSED = _Broken("broken-all-logits-rows", _AllLogitsRowsReversed)
SYNTHETIC_AS_DEFAULT = _Broken("broken-synthetic", FakeModel, priority=0)


# -- well-behaved variants -------------------------------------------------------------------

#: The echo model's period, and a text repeating with it.
PERIOD = 7
PATTERN = [30 + 5 * i for i in range(PERIOD)]


class EchoModel(FakeModel):
    """The fake, leaning towards the token ``PERIOD`` places back: it continues a repeating text,
    as a model summarising or rewriting its prompt does, so prompt lookup drafts are often right."""

    bias = 30.0  # wins greedy decoding; at temperature 5 it leaves about a third to the echo

    def _lean(self, logits, kvs, counts):
        rows = []
        for kv, n in zip(kvs, counts, strict=True):
            for i in range(n):
                end = kv.length - n + i + 1  # context length after the row's i-th token
                rows.append(kv._tokens[end - PERIOD] if end >= PERIOD else 0)
        logits = logits.copy()
        logits[np.arange(len(rows)), rows] += np.float32(self.bias)
        return logits

    def forward(self, batch):
        return self._lean(super().forward(batch), batch.sequences, [1] * batch.size)

    def forward_all(self, batch):
        return self._lean(super().forward_all(batch), batch.sequences, [len(t) for t in batch.tokens])

    def draft(self, batch):
        return self._lean(super().draft(batch), batch.sequences, [1] * batch.size)
