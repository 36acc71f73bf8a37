"""The default sampler: sampling parameters, per-request state, and the processing chain.

The package's rooms, each with one job:

- :mod:`~infer.sampling.params`: :class:`SamplingParams` and their validation;
- :mod:`~infer.sampling.state`: :class:`SamplerState`, one request's seeded generator and the
  token bookkeeping the penalties need;
- :mod:`~infer.sampling.chain`: :func:`sample`, :func:`logprobs` and :class:`DefaultSampler`;
- :mod:`~infer.sampling._fast`: the measured fast paths the chain runs on (private).

This module only hands their public names on: ``from infer.sampling import X`` works for each.
:class:`SamplingParams` and :class:`SamplerState` are also importable from :mod:`infer` itself;
:func:`sample`, :func:`logprobs` and :class:`DefaultSampler` are public here, for the engine and
for plugins, but not part of the top-level API.
"""

from __future__ import annotations

from infer.sampling.chain import DefaultSampler, logprobs, sample
from infer.sampling.params import (
    BAN_BIAS,
    GREEDY_TEMPERATURE,
    MAX_REPETITION_PENALTY,
    MAX_TOP_LOGPROBS,
    MIN_REPETITION_PENALTY,
    SamplingParams,
)
from infer.sampling.state import SamplerState

__all__ = [
    "BAN_BIAS",
    "GREEDY_TEMPERATURE",
    "MAX_REPETITION_PENALTY",
    "MAX_TOP_LOGPROBS",
    "MIN_REPETITION_PENALTY",
    "DefaultSampler",
    "SamplerState",
    "SamplingParams",
    "logprobs",
    "sample",
]
