"""Fixtures for infer-core's own tests."""

from __future__ import annotations

import collections
from collections.abc import Iterator
from typing import Any

import pytest

import infer


@pytest.fixture
def fake() -> Iterator[infer.Model]:
    """A fake-backend model with its own byte-level tokenizer."""
    model = infer.load("fake", backend="fake")
    yield model
    model.close()


@pytest.fixture
def validations(monkeypatch: pytest.MonkeyPatch) -> collections.Counter[str]:
    """Counts of SamplingParams' two checks: every field (on construction) and the token ids against a vocabulary."""
    from infer.sampling import SamplingParams

    counts: collections.Counter[str] = collections.Counter()
    every_field, token_ids = SamplingParams._checked, SamplingParams._check_vocab

    def checked(self: SamplingParams, vocab_size: int | None) -> dict[str, Any]:
        counts["fields"] += 1
        return every_field(self, vocab_size)

    def check_vocab(self: SamplingParams, vocab_size: int) -> None:
        counts["token ids"] += 1
        token_ids(self, vocab_size)

    monkeypatch.setattr(SamplingParams, "_checked", checked)
    monkeypatch.setattr(SamplingParams, "_check_vocab", check_vocab)
    return counts
