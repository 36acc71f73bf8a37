"""infer-backend-fake: a deterministic backend with fault injection, and the plugin template."""

from infer_backend_fake.plugin import FakeKV, FakeModel, FakeOptions

__all__ = ["FakeKV", "FakeModel", "FakeOptions"]
