"""The tokenizer wrapper: loading errors and the incremental decoder's guarantees."""

from __future__ import annotations

import pytest

import infer
from infer.tokenizer import MAX_PENDING_TOKENS, Tokenizer
from infer_backend_fake.plugin import build_tokenizer

pytestmark = pytest.mark.unit


@pytest.fixture
def tok() -> Tokenizer:
    return Tokenizer(build_tokenizer(512))


def test_a_character_split_over_byte_tokens_appears_once_complete(tok):
    ids = tok.encode("€")  # three bytes, three tokens
    decoder = tok.stream_decoder()
    assert [decoder.step(i) for i in ids] == ["", "", "€"]


def test_a_run_of_invalid_bytes_is_emitted_as_replacement_characters_and_decoding_goes_on(tok):
    continuation_byte = tok.encode("é")[1]  # a UTF-8 continuation byte alone never completes
    decoder = tok.stream_decoder()
    out = [decoder.step(continuation_byte) for _ in range(MAX_PENDING_TOKENS)]
    assert out[:-1] == [""] * (MAX_PENDING_TOKENS - 1)
    assert set(out[-1]) == {"\ufffd"}
    assert [decoder.step(i) for i in tok.encode("ok")] == ["o", "k"]


def test_special_tokens_are_recognised_in_text_and_skipped_when_decoding(tok):
    ids = tok.encode("hi<|im_end|>")
    assert ids[-1] == tok.token_to_id("<|im_end|>")
    assert tok.decode(ids) == "hi"
    assert tok.id_to_token(ids[-1]) == "<|im_end|>"


def test_a_missing_tokenizer_file_is_a_typed_not_found_error(tmp_path):
    with pytest.raises(infer.ModelNotFoundError):
        Tokenizer.from_file(tmp_path / "tokenizer.json")


def test_a_corrupt_tokenizer_file_names_the_file(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(infer.ModelFormatError, match=r"tokenizer\.json"):
        Tokenizer.from_file(bad)
