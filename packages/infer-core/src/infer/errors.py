"""Typed errors raised by infer.

Every error subclasses :class:`InferError` and, where one fits, the builtin that callers
already catch, so ``except ValueError`` or ``except TimeoutError`` keeps working::

    InferError (Exception)
    ├── PluginError
    │   ├── ContractVersionError
    │   └── BackendNotFoundError (LookupError)
    ├── BackendUnavailableError (RuntimeError)
    ├── ModelError
    │   ├── ModelNotFoundError (FileNotFoundError)
    │   ├── ModelFormatError (ValueError)
    │   └── UnsupportedModelError (ValueError)
    ├── RequestError (ValueError)
    │   ├── InvalidParameterError
    │   │   └── GrammarError
    │   ├── InvalidTokenError
    │   ├── EmptyPromptError
    │   ├── ContextLengthError
    │   │   └── PromptTooLongError
    │   └── ChatTemplateError
    ├── RequestCancelledError
    ├── DeadlineExceededError (TimeoutError)
    ├── BackendError (RuntimeError)
    └── ModelClosedError (RuntimeError)

Each error carries the context a user needs as attributes (which plugin, which file,
which parameter, which token) and says what to do in its message.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "BackendError",
    "BackendNotFoundError",
    "BackendUnavailableError",
    "ChatTemplateError",
    "ContextLengthError",
    "ContractVersionError",
    "DeadlineExceededError",
    "EmptyPromptError",
    "GrammarError",
    "InferError",
    "InvalidParameterError",
    "InvalidTokenError",
    "ModelClosedError",
    "ModelError",
    "ModelFormatError",
    "ModelNotFoundError",
    "PromptTooLongError",
    "PluginError",
    "RequestCancelledError",
    "RequestError",
    "UnsupportedModelError",
]


class InferError(Exception):
    """Base class of every error infer raises on purpose."""


class PluginError(InferError):
    """A backend plugin could not be used.

    ``plugin`` names the entry point (or registered name) and ``version`` the version of the
    distribution that provides it, when known.
    """

    def __init__(self, message: str, *, plugin: str, version: str | None = None) -> None:
        super().__init__(message)
        self.plugin = plugin
        self.version = version


class ContractVersionError(PluginError):
    """A backend implements a contract major version this infer-core does not speak."""

    def __init__(self, *, plugin: str, version: str | None, plugin_contract: str, core_contract: str) -> None:
        super().__init__(
            f"backend plugin {plugin!r} ({version or 'unknown version'}) implements infer contract "
            f"{plugin_contract}, but this infer-core speaks contract {core_contract}; "
            f"install a release of {plugin!r} built for contract {core_contract.split('.', maxsplit=1)[0]}.x",
            plugin=plugin,
            version=version,
        )
        self.plugin_contract = plugin_contract
        self.core_contract = core_contract


class BackendNotFoundError(PluginError, LookupError):
    """No installed backend has the requested name, or none can load the model."""


class BackendUnavailableError(InferError, RuntimeError):
    """The backend is installed but cannot run here (wrong platform, missing device or provider)."""

    def __init__(self, message: str, *, backend: str, device: str | None = None) -> None:
        super().__init__(message)
        self.backend = backend
        self.device = device


class ModelError(InferError):
    """A model could not be opened. ``path`` names the file or folder at fault."""

    def __init__(self, message: str, *, path: str | Path | None = None) -> None:
        super().__init__(message)
        self.path = Path(path) if path is not None else None


class ModelNotFoundError(ModelError, FileNotFoundError):
    """The model reference names no file, folder or known model."""


class ModelFormatError(ModelError, ValueError):
    """A model file is malformed, truncated, or disagrees with its configuration."""


class UnsupportedModelError(ModelError, ValueError):
    """The model's architecture or a feature it uses is not supported."""


class RequestError(InferError, ValueError):
    """A generation request is invalid; nothing was run and the model is unchanged."""


class InvalidParameterError(RequestError):
    """A sampling or request parameter is out of range. ``parameter`` names it."""

    def __init__(self, parameter: str, value: object, expected: str) -> None:
        super().__init__(f"invalid {parameter}={value!r}: expected {expected}")
        self.parameter = parameter
        self.value = value
        self.expected = expected


class GrammarError(InvalidParameterError):
    """A ``response_format`` (JSON schema, regex or grammar) is malformed or does not compile."""

    def __init__(self, problem: str) -> None:
        super().__init__("response_format", None, "a valid JSON schema, regex or grammar")
        self.args = (f"invalid response_format: {problem}",)
        self.problem = problem


class InvalidTokenError(RequestError):
    """A token id is outside the model's vocabulary."""

    def __init__(self, token_id: int, vocab_size: int, position: int | None = None) -> None:
        where = f" at position {position}" if position is not None else ""
        super().__init__(
            f"token id {token_id}{where} is outside the vocabulary [0, {vocab_size}); "
            "pass ids produced by this model's tokenizer"
        )
        self.token_id = token_id
        self.vocab_size = vocab_size
        self.position = position


class EmptyPromptError(RequestError):
    """The prompt has no tokens; give text, messages or at least one token id."""


class ContextLengthError(RequestError):
    """The prompt (plus the tokens asked for, where that is required) exceeds the context."""

    def __init__(self, prompt_tokens: int, context_length: int) -> None:
        super().__init__(
            f"prompt of {prompt_tokens} tokens does not fit the context of {context_length} tokens; "
            "shorten the prompt or load the model with a larger context_length"
        )
        self.prompt_tokens = prompt_tokens
        self.context_length = context_length


class PromptTooLongError(ContextLengthError):
    """The prompt text has more bytes than any prompt that fits could have; refused before tokenizing.

    ``prompt_bytes`` is its UTF-8 length and ``max_bytes`` the limit (see :attr:`infer.Model.max_prompt_bytes`).
    """

    def __init__(self, prompt_bytes: int, max_bytes: int, context_length: int) -> None:
        RequestError.__init__(
            self,
            f"prompt of {prompt_bytes} bytes cannot fit the context of {context_length} tokens (at most "
            f"{max_bytes} bytes can); shorten the prompt",
        )
        self.prompt_bytes = prompt_bytes
        self.max_bytes = max_bytes
        self.prompt_tokens = -1  # not counted: tokenizing it is the work this error avoids
        self.context_length = context_length


class ChatTemplateError(RequestError):
    """Chat messages were given but the model has no chat template, or the template failed."""


class RequestCancelledError(InferError):
    """The request was cancelled before it produced a result."""


class DeadlineExceededError(InferError, TimeoutError):
    """The request ran past its ``timeout``; the model stays usable for the next request."""

    def __init__(self, timeout: float, generated_tokens: int) -> None:
        super().__init__(f"request exceeded its timeout of {timeout:g} s after {generated_tokens} generated tokens")
        self.timeout = timeout
        self.generated_tokens = generated_tokens


class BackendError(InferError, RuntimeError):
    """A backend step failed. ``backend`` names it; the request ends, the model stays usable."""

    def __init__(self, message: str, *, backend: str) -> None:
        super().__init__(message)
        self.backend = backend


class ModelClosedError(InferError, RuntimeError):
    """The model was closed; load it again to generate."""
