"""Correct backends declaring capabilities no shipped backend declares: the suite must pass them.

The teeth test (``packages/infer-core/tests``) proves the capability tests fail broken
implementations; these controls prove they pass a correct one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import infer
from infer.sampling import sample
from infer_backend_fake import FakeModel
from infer_backend_fake import plugin as fake

_DEVICE_MASKED = frozenset({infer.Capability.DEVICE_SAMPLING, infer.Capability.TOKEN_MASK})


class DeviceSampler:
    """The fake, plus a device sampler that is the reference sampler run on its own (which honours
    token masks, so it declares them too)."""

    name = "control-device-sampling"

    @infer.hookimpl
    def infer_backend_info(self) -> infer.BackendInfo:
        info = fake.infer_backend_info()
        return replace(info, name=self.name, capabilities=info.capabilities | _DEVICE_MASKED)

    @infer.hookimpl
    def infer_load(self, spec: infer.LoadSpec, options: Mapping[str, Any]) -> Any:
        return FakeModel.from_spec(replace(spec, backend=fake.NAME), options) if spec.backend == self.name else None

    @infer.hookimpl
    def infer_prefill(self, model: infer.ModelHandle, batch: infer.Batch) -> Any:
        return model.forward(batch) if isinstance(model, FakeModel) else None

    @infer.hookimpl
    def infer_decode(self, model: infer.ModelHandle, batch: infer.Batch) -> Any:
        return model.forward(batch) if isinstance(model, FakeModel) else None

    @infer.hookimpl
    def infer_sample(self, logits: Any, params: Any, states: Any) -> Any:
        return sample(logits.copy(), params, states)


DEVICE_SAMPLING = DeviceSampler()
