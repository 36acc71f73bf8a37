"""Text <-> token ids, through the ``tokenizers`` library.

:class:`Tokenizer` wraps a ``tokenizers.Tokenizer`` and adds the incremental decoder the engine
streams with: :meth:`Tokenizer.stream_decoder` never emits half a UTF-8 character (a
character split over several byte tokens appears once all its bytes have arrived).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, final

from infer.errors import ModelFormatError, ModelNotFoundError

if TYPE_CHECKING:
    import tokenizers

__all__ = ["StreamDecoder", "Tokenizer"]


#: Tokens a decoder may hold back waiting for a character to complete. A UTF-8 character is at
#: most 4 bytes, so longer runs can only be invalid byte sequences: they are emitted as U+FFFD
#: instead of being re-decoded on every step (which would make a stream quadratic).
MAX_PENDING_TOKENS = 8
# Texts longer than this are tokenized through the GIL-releasing batch call.
_GIL_FREE_CHARS = 16_384


@final
class StreamDecoder:
    """Turns tokens into text deltas one at a time, holding back incomplete characters."""

    __slots__ = ("_pending", "_stream", "_tok")

    def __init__(self, tok: tokenizers.Tokenizer) -> None:
        self._tok = tok
        self._stream = self._new_stream()
        self._pending: list[int] = []

    @staticmethod
    def _new_stream() -> Any:
        from tokenizers.decoders import DecodeStream

        return DecodeStream(skip_special_tokens=True)

    def step(self, token_id: int) -> str:
        """The text that ``token_id`` completes ("" while a character is still partial)."""
        text: str | None = self._stream.step(self._tok, token_id)
        if text:
            if self._pending:
                self._pending.clear()
            return text
        self._pending.append(token_id)
        if len(self._pending) < MAX_PENDING_TOKENS:
            return ""
        stuck, self._pending = self._pending, []
        self._stream = self._new_stream()
        return self._tok.decode(stuck, skip_special_tokens=True)


@final
class Tokenizer:
    """A model's tokenizer."""

    __slots__ = ("_tok", "vocab_size")

    def __init__(self, tok: tokenizers.Tokenizer) -> None:
        self._tok = tok
        #: Size of the tokenizer's vocabulary, added tokens included.
        self.vocab_size: int = tok.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load ``tokenizer.json``; raise a typed error naming the file when it is missing or bad."""
        from tokenizers import Tokenizer as HFTokenizer

        file = Path(path)
        if not file.is_file():
            raise ModelNotFoundError(f"tokenizer file {str(file)!r} does not exist", path=file)
        try:
            return cls(HFTokenizer.from_file(str(file)))
        except Exception as exc:
            raise ModelFormatError(f"{file.name} is not a valid tokenizer: {exc}", path=file) from exc

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; special tokens written in the text are recognised."""
        if len(text) > _GIL_FREE_CHARS:
            # encode_batch runs with the GIL released (encode holds it): a long prompt tokenized
            # in a worker thread then leaves the server's event loop free meanwhile.
            return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    @property
    def max_token_bytes(self) -> int:
        """UTF-8 length of the longest token string in the vocabulary (added tokens included).

        A token's string is never shorter than the text it stands for in the tokenizers this
        project reads (byte-level BPE maps each byte to one character; SentencePiece and
        byte-fallback pieces spell a byte with more), so text of ``n`` bytes needs at least
        ``n / max_token_bytes`` tokens: a bound checked before tokenizing anything.
        """
        return max((len(token.encode()) for token in self._tok.get_vocab(with_added_tokens=True)), default=1)

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Text of ``ids``."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """Id of a token string (e.g. ``"<|im_end|>"``), or ``None``."""
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """Token string of an id, or ``None``."""
        return self._tok.id_to_token(token_id)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for, even when they are only part of a UTF-8 character.

        ``decode([id])`` turns such a partial character into U+FFFD; this reads the vocabulary
        instead: byte-level BPE spells each byte as one character, SentencePiece's byte
        fallback as ``<0xNN>`` and a space as ``▁``. Other tokens give their decoded text.
        """
        piece = self._tok.id_to_token(token_id)
        if piece is None:
            return b""
        fallback = _BYTE_FALLBACK.fullmatch(piece)
        if fallback is not None:
            return bytes([int(fallback.group(1), 16)])
        from tokenizers.decoders import ByteLevel

        if isinstance(self._tok.decoder, ByteLevel):
            table = _byte_level_table()
            if all(ch in table for ch in piece):
                return bytes(table[ch] for ch in piece)
            return piece.encode()  # an added token, spelled as plain text
        text = self._tok.decode([token_id], skip_special_tokens=False)
        return (text if "\ufffd" not in text else piece.replace("\u2581", " ")).encode()

    def stream_decoder(self) -> StreamDecoder:
        """A fresh incremental decoder for one generated sequence."""
        return StreamDecoder(self._tok)


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@lru_cache(maxsize=1)
def _byte_level_table() -> dict[str, int]:
    """Character -> byte of byte-level BPE (GPT-2's scheme): printable Latin-1 bytes stand for
    themselves, the other 68 bytes for the characters from U+0100 on, in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {chr(b): b for b in printable}
    shifted = (b for b in range(256) if b not in table.values())
    table.update({chr(0x100 + n): b for n, b in enumerate(shifted)})
    return table
