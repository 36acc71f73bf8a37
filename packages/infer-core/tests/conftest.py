"""Fixtures for infer-core's own tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import infer


@pytest.fixture
def fake() -> Iterator[infer.Model]:
    """A fake-backend model with its own byte-level tokenizer."""
    model = infer.load("fake", backend="fake")
    yield model
    model.close()
