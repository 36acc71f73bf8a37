"""infer: a plugin-based LLM inference microkernel.

import infer

model = infer.load("smollm2-135m-instruct")
print(model.generate(messages=[{"role": "user", "content": "What is 2+2?"}], temperature=0).text)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from infer._lazy import lazy_attributes

if TYPE_CHECKING:
    from infer.contract import CONTRACT_VERSION, BackendInfo, Batch, Capability, KVCache, LoadSpec, ModelHandle
    from infer.errors import (
        BackendError,
        BackendNotFoundError,
        BackendUnavailableError,
        ChatTemplateError,
        ContextLengthError,
        ContractVersionError,
        DeadlineExceededError,
        EmptyPromptError,
        GrammarError,
        InferError,
        InvalidParameterError,
        InvalidTokenError,
        ModelClosedError,
        ModelError,
        ModelFormatError,
        ModelNotFoundError,
        PluginError,
        PromptTooLongError,
        RequestCancelledError,
        RequestError,
        UnsupportedModelError,
    )
    from infer.hookspecs import hookimpl, hookspec
    from infer.model import AsyncTokenStream, Model, PreparedRequest, TokenStream, load
    from infer.results import Completion, Timings, TokenEvent, Usage
    from infer.sampling import SamplerState, SamplingParams

__version__ = "0.1.0"

# Public names load on first use (PEP 562): `infer --help` must not pay for numpy and friends.
_LAZY = {
    "AsyncTokenStream": "infer.model",
    "BackendError": "infer.errors",
    "BackendInfo": "infer.contract",
    "BackendNotFoundError": "infer.errors",
    "BackendUnavailableError": "infer.errors",
    "Batch": "infer.contract",
    "CONTRACT_VERSION": "infer.contract",
    "Capability": "infer.contract",
    "ChatTemplateError": "infer.errors",
    "Completion": "infer.results",
    "ContextLengthError": "infer.errors",
    "ContractVersionError": "infer.errors",
    "DeadlineExceededError": "infer.errors",
    "EmptyPromptError": "infer.errors",
    "GrammarError": "infer.errors",
    "InferError": "infer.errors",
    "InvalidParameterError": "infer.errors",
    "InvalidTokenError": "infer.errors",
    "KVCache": "infer.contract",
    "LoadSpec": "infer.contract",
    "Model": "infer.model",
    "ModelClosedError": "infer.errors",
    "ModelError": "infer.errors",
    "ModelFormatError": "infer.errors",
    "ModelHandle": "infer.contract",
    "ModelNotFoundError": "infer.errors",
    "PluginError": "infer.errors",
    "PreparedRequest": "infer.model",
    "PromptTooLongError": "infer.errors",
    "RequestCancelledError": "infer.errors",
    "RequestError": "infer.errors",
    "SamplerState": "infer.sampling",
    "SamplingParams": "infer.sampling",
    "Timings": "infer.results",
    "TokenEvent": "infer.results",
    "TokenStream": "infer.model",
    "UnsupportedModelError": "infer.errors",
    "Usage": "infer.results",
    "hookimpl": "infer.hookspecs",
    "hookspec": "infer.hookspecs",
    "load": "infer.model",
}


__all__ = [
    "CONTRACT_VERSION",
    "AsyncTokenStream",
    "BackendError",
    "BackendInfo",
    "BackendNotFoundError",
    "BackendUnavailableError",
    "Batch",
    "Capability",
    "ChatTemplateError",
    "Completion",
    "ContextLengthError",
    "ContractVersionError",
    "DeadlineExceededError",
    "EmptyPromptError",
    "GrammarError",
    "InferError",
    "InvalidParameterError",
    "InvalidTokenError",
    "KVCache",
    "LoadSpec",
    "Model",
    "ModelClosedError",
    "ModelError",
    "ModelFormatError",
    "ModelHandle",
    "ModelNotFoundError",
    "PluginError",
    "PreparedRequest",
    "PromptTooLongError",
    "RequestCancelledError",
    "RequestError",
    "SamplerState",
    "SamplingParams",
    "Timings",
    "TokenEvent",
    "TokenStream",
    "UnsupportedModelError",
    "Usage",
    "__version__",
    "hookimpl",
    "hookspec",
    "load",
]


__getattr__, __dir__ = lazy_attributes("infer", globals(), _LAZY, __all__)
