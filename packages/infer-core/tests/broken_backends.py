"""Deliberately broken variants of the fake backend: the conformance suite must fail on each.

Load one into a suite run with ``--infer-plugin broken_backends:NAME --infer-backend broken-...``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np

import infer
from infer_backend_fake import FakeKV, FakeModel
from infer_backend_fake import plugin as fake


class _Broken:
    """A backend plugin serving ``model_class`` (a broken FakeModel) under ``name``."""

    def __init__(self, name: str, model_class: type[FakeModel]) -> None:
        self.name = name
        self.model_class = model_class

    @infer.hookimpl
    def infer_backend_info(self) -> infer.BackendInfo:
        return replace(fake.infer_backend_info(), name=self.name)

    @infer.hookimpl
    def infer_load(self, spec: infer.LoadSpec, options: Mapping[str, Any]) -> FakeModel | None:
        if spec.backend != self.name:
            return None
        return self.model_class.from_spec(replace(spec, backend=fake.NAME), options)

    @infer.hookimpl
    def infer_prefill(self, model: infer.ModelHandle, batch: infer.Batch) -> Any:
        return model.forward(batch) if isinstance(model, self.model_class) else None

    @infer.hookimpl
    def infer_decode(self, model: infer.ModelHandle, batch: infer.Batch) -> Any:
        if not isinstance(model, self.model_class):
            return None
        return model.decode_step(batch) if hasattr(model, "decode_step") else model.forward(batch)


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


class _LeakyKV(FakeKV):
    def release(self) -> None:
        pass  # ignores cancellation: the cache lives on after its request ended


class _CancellationIgnored(FakeModel):
    def new_sequence(self, capacity: int) -> FakeKV:
        return _LeakyKV(min(capacity, self.context_length))


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


KV_NOT_APPENDED = _Broken("broken-kv", _KVNotAppended)
SEED_IGNORED = _SeedIgnored("broken-seed", FakeModel)
CANCELLATION_IGNORED = _Broken("broken-cancel", _CancellationIgnored)
PERTURBED_LOGITS = _Broken("broken-logits", _PerturbedLogits)
WRONG_VOCAB = _Broken("broken-vocab", _WrongVocab)
