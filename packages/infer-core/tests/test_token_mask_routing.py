"""Contract 1.2: constrained rows reach a device sampler only when it declares token masks.

A backend that samples on its device (``DEVICE_SAMPLING``) without ``TOKEN_MASK`` was written
before masks existed: the engine draws its constrained rows on the host chain, which applies the
mask, and its other rows on the device as before.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from broken_backends import _Broken

import infer
from infer.contract import usable_capabilities
from infer.plugins import get_registry
from infer.sampling import SamplerState, SamplingParams
from infer_backend_fake import FakeModel
from infer_backend_fake import plugin as fake_backend

pytestmark = pytest.mark.integration

Cap = infer.Capability


class _GreedyDeviceSampler(_Broken):
    """The fake with a device sampler that takes the argmax, mask or no mask, and records its rows."""

    def __init__(self, name: str, capabilities: frozenset[infer.Capability]) -> None:
        super().__init__(name, FakeModel, add_capabilities=capabilities)
        #: per call, per row: (the row is constrained, the row arrived with a mask)
        self.calls: list[list[tuple[bool, bool]]] = []

    @infer.hookimpl
    def infer_sample(self, logits: Any, params: Any, states: Any) -> Any:
        self.calls.append(
            [(p.constraint is not None, s.token_mask is not None) for p, s in zip(params, states, strict=True)]
        )
        out = np.empty(len(params), dtype=np.int64)
        for i, state in enumerate(states):
            row = logits[i] if state.token_mask is None else np.where(state.token_mask, logits[i], -np.inf)
            out[i] = int(np.argmax(row))
        return out


def _loaded(name: str, capabilities: frozenset[infer.Capability]) -> tuple[_GreedyDeviceSampler, infer.Model]:
    plugin = _GreedyDeviceSampler(name, capabilities)
    get_registry().register_backend(plugin, name=name)
    return plugin, infer.load("fake", backend=name)


@pytest.fixture
def unmasked():
    """A device sampler of contract 1.1's kind: DEVICE_SAMPLING without TOKEN_MASK."""
    plugin, model = _loaded("device-no-mask", frozenset({Cap.DEVICE_SAMPLING}))
    yield plugin, model
    model.close()
    get_registry().unregister(plugin)


@pytest.fixture
def masked():
    plugin, model = _loaded("device-mask", frozenset({Cap.DEVICE_SAMPLING, Cap.TOKEN_MASK}))
    yield plugin, model
    model.close()
    get_registry().unregister(plugin)


def test_a_device_sampler_without_token_masks_never_receives_a_constrained_row(unmasked):
    plugin, model = unmasked
    reply = model.generate("x", response_format={"type": "regex", "pattern": "z{3}"}, temperature=0)
    assert reply.text == "zzz"
    assert not any(constrained for call in plugin.calls for constrained, _ in call)


def test_a_device_sampler_without_token_masks_still_draws_the_unconstrained_rows(unmasked):
    plugin, model = unmasked
    model.generate("x", temperature=0, max_tokens=3)
    assert sum(len(call) for call in plugin.calls) == 3


def test_a_mixed_batch_splits_constrained_rows_to_the_host_and_keeps_the_others_on_the_device(unmasked):
    plugin, model = unmasked
    constraint = model.compile_response_format({"type": "regex", "pattern": "z+"})
    plain = SamplingParams(temperature=0)
    params = [plain, SamplingParams(temperature=0, constraint=constraint), plain]
    states = [SamplerState(p, [1, 2], model.vocab_size) for p in params]
    logits = np.zeros((3, model.vocab_size), dtype=np.float32)
    logits[:, 7] = 5.0  # the favourite token, which the regex does not allow
    model.generate("x", max_tokens=1)  # the engine binds its sampler calls on its first step
    plugin.calls.clear()
    chosen = model._engine._draw(logits, params, states).tolist()
    z = model.tokenizer.encode("z")[0]
    assert chosen == [7, z, 7]
    assert plugin.calls == [[(False, False), (False, False)]]


def test_a_device_sampler_declaring_token_masks_receives_constrained_rows_with_their_mask(masked):
    plugin, model = masked
    reply = model.generate("x", response_format={"type": "regex", "pattern": "z{3}"}, temperature=0)
    assert reply.text == "zzz"
    constrained = [row for call in plugin.calls for row in call if row[0]]
    assert constrained and all(has_mask for _, has_mask in constrained)


def test_a_backend_built_for_contract_1_1_gets_no_token_masks_even_if_it_lists_them():
    info = replace(
        fake_backend.infer_backend_info(),
        contract_version="1.1",
        capabilities=frozenset({Cap.DEVICE_SAMPLING, Cap.TOKEN_MASK, Cap.FORK}),
    )
    assert usable_capabilities(info) == {Cap.DEVICE_SAMPLING, Cap.FORK}
    assert Cap.TOKEN_MASK in usable_capabilities(replace(info, contract_version="1.2"))
