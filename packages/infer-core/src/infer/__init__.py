"""infer: a plugin-based LLM inference microkernel."""

from infer.contract import CONTRACT_VERSION, BackendInfo, Batch, Capability, KVCache, LoadSpec, ModelHandle
from infer.hookspecs import hookimpl, hookspec

__all__ = [
    "CONTRACT_VERSION",
    "BackendInfo",
    "Batch",
    "Capability",
    "KVCache",
    "LoadSpec",
    "ModelHandle",
    "hookimpl",
    "hookspec",
]
