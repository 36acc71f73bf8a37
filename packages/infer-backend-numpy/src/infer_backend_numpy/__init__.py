"""An example infer backend running real weights with numpy (see :mod:`infer_backend_numpy.plugin`)."""

from infer_backend_numpy.plugin import NumpyKV, NumpyModel

__all__ = ["NumpyKV", "NumpyModel"]
