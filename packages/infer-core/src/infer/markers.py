"""The pluggy markers of the ``infer`` project: :data:`hookspec` and :data:`hookimpl`.

Their own module so that an implementation inside the core (the default sampler) can mark its
hooks without importing :mod:`infer.hookspecs`, whose annotations name the types it implements
with: the contract imports the sampler's types, the sampler imports only this.
"""

from __future__ import annotations

import pluggy

__all__ = ["hookimpl", "hookspec"]

#: Marker for hook specifications (used by infer-core only).
hookspec = pluggy.HookspecMarker("infer")
#: Marker for hook implementations: decorate a backend's hook functions with it.
hookimpl = pluggy.HookimplMarker("infer")
