"""The public face: :func:`load` returns a :class:`Model`; models generate and stream."""

from __future__ import annotations

import contextlib
import functools
import inspect
import queue
import re
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Concatenate, Final, ParamSpec, TypeVar, cast, final

import numpy as np
import numpy.typing as npt

from infer.contract import (
    BackendInfo,
    Batch,
    Capability,
    KVCache,
    LoadSpec,
    ModelHandle,
    token_rows,
    usable_capabilities,
)
from infer.engine import Channel, Done, Engine, Failed, Request
from infer.errors import (
    BackendNotFoundError,
    BackendUnavailableError,
    ChatTemplateError,
    ContextLengthError,
    DeadlineExceededError,
    EmptyPromptError,
    InvalidParameterError,
    InvalidTokenError,
    ModelError,
    ModelFormatError,
    ModelNotFoundError,
    PromptTooLongError,
    RequestCancelledError,
    UnsupportedModelError,
)
from infer.log import get_logger
from infer.prefix_cache import DEFAULT_BUDGET, PrefixCache, PrefixStats
from infer.results import Completion, TokenEvent
from infer.sampling import SamplingParams
from infer.speculative import AUTO_SPECULATION_ATOL, MODES, NgramDrafter, StepDrafter
from infer.tokenizer import Tokenizer

if TYPE_CHECKING:
    from infer.bundle import Bundle
    from infer.plugins import Backend, Registry
    from infer.structured import Constraint, TokenizerGrammars
    from infer.tools import ToolFormat

__all__ = ["AsyncTokenStream", "Model", "PreparedRequest", "TokenStream", "load"]

_SAMPLING_FIELDS = frozenset(f.name for f in fields(SamplingParams) if f.init)
#: Token events buffered per stream before the scheduler pauses that request.
STREAM_BUFFER = 64


def load(
    ref: str | Path,
    *,
    backend: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    context_length: int | None = None,
    prefill_chunk_size: int = 256,
    prefix_cache: bool | int | str = False,
    speculative: str = "off",
    registry: Registry | None = None,
    **options: Any,
) -> Model:
    """Load a model and return it ready to generate.

    ``ref`` is a Hugging Face-layout model folder, a ``.gguf`` file (converted into the cache on
    first use), a model name known to ``infer pull`` (e.g. ``"smollm2-135m-instruct"``), an
    ``hf:ORG/NAME`` reference found in the local Hugging Face cache, or a backend-specific
    reference. ``backend=None`` picks the most preferred installed backend that can load it.
    ``prefix_cache`` keeps finished requests' KV caches, indexed by their tokens, so a request
    whose prompt starts like an earlier one (the next chat turn, a shared system prompt) skips
    prefilling that prefix: ``True`` within a default budget (512 MiB), an int for a budget in
    bytes, ``"auto"`` for on when the backend declares the ``fork`` capability (contract 1.1) and
    off otherwise, ``False`` (the default) for off. ``Completion.usage.cached_tokens`` says how
    many prompt tokens a request took from it.
    ``speculative`` is the default of every request's ``speculative=`` option: ``"ngram"`` drafts
    tokens by prompt lookup and verifies them in one step (needs the ``truncate`` and
    ``all_logits`` capabilities), ``"auto"`` does so where the backend can and the model's
    ``logits_atol`` is at most 1e-3 (so the tokens are those of plain decoding; at int4, say, it
    stays off), ``"off"`` (the default) never. Where the backend declares draft steps (contract
    1.3, e.g. the ONNX backend's ``draft="native"`` option under an fp32 model), a speculating
    request also drafts through them. See :mod:`infer.speculative`.
    Remaining keyword arguments are backend options (see the backend's documentation).
    """
    from infer.plugins import get_registry

    budget = _prefix_budget(prefix_cache)
    if speculative not in MODES:
        raise InvalidParameterError("speculative", speculative, f"one of {list(MODES)}")

    if not isinstance(prefill_chunk_size, int) or isinstance(prefill_chunk_size, bool) or prefill_chunk_size < 1:
        raise InvalidParameterError("prefill_chunk_size", prefill_chunk_size, "a positive integer")
    if context_length is not None and (not isinstance(context_length, int) or context_length < 2):
        raise InvalidParameterError("context_length", context_length, "an integer >= 2 or None")
    reg = registry or get_registry()
    started = time.perf_counter()
    with _repair_hint():
        model = _load(ref, backend, device, dtype, context_length, prefill_chunk_size, reg, options, started)
    if budget is not None:
        if Capability.FORK in model._engine.capabilities:
            model._engine.prefix_cache = PrefixCache(budget)
        elif prefix_cache != "auto":
            model.close()
            raise InvalidParameterError(
                "prefix_cache",
                prefix_cache,
                f"False or 'auto': backend {model.backend!r} does not declare the 'fork' capability (contract 1.1)",
            )
    try:
        model.speculative = model._speculation(speculative)
    except InvalidParameterError:
        model.close()
        raise
    return model


def _prefix_budget(value: object) -> int | None:
    """The byte budget ``prefix_cache=value`` asks for, ``None`` for off; refuse anything else."""
    if value is False:
        return None
    if value is True or value == "auto":
        return DEFAULT_BUDGET
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    raise InvalidParameterError("prefix_cache", value, "True, False, 'auto' or a positive budget in bytes")


@contextlib.contextmanager
def _repair_hint() -> Iterator[None]:
    """Add to a broken-file error of a bundle the store made how to repair it (pull --force...)."""
    try:
        yield
    except ModelFormatError as exc:
        from infer.store import repair_hint

        hint = repair_hint(exc.path)
        if hint is None or hint in str(exc):
            raise
        raise ModelFormatError(f"{exc}; {hint}", path=exc.path) from exc


def _load(  # noqa: PLR0917 - the arguments of load(), checked there
    ref: str | Path,
    backend: str | None,
    device: str | None,
    dtype: str | None,
    context_length: int | None,
    prefill_chunk_size: int,
    reg: Registry,
    options: dict[str, Any],
    started: float,
) -> Model:
    from infer.bundle import Bundle, is_bundle
    from infer.resolve import resolve_model

    path = resolve_model(str(ref))
    bundle = Bundle.open(path) if path is not None and is_bundle(path) else None
    if backend is not None:
        chosen = reg.backend(backend)
        if not chosen.info.available:
            raise BackendUnavailableError(
                f"backend {backend!r} cannot run here: {chosen.info.unavailable_reason}", backend=backend, device=device
            )
        candidates = [chosen]
    else:
        candidates = reg.ranked()
        if not candidates:
            raise BackendNotFoundError("no backend is installed; pip install 'infer-core[onnx]'", plugin="")
    for candidate in candidates:
        spec = LoadSpec(
            backend=candidate.name,
            ref=str(ref),
            path=path,
            bundle=bundle,
            device=device,
            dtype=dtype,
            context_length=context_length,
        )
        handle = candidate.hooks.load(spec=spec, options=dict(options))
        if handle is not None:
            break
    else:
        tried = ", ".join(c.name for c in candidates)
        if path is None:
            from infer.pull import KNOWN_MODELS

            raise ModelNotFoundError(
                f"{str(ref)!r} is not a model folder, a .gguf file, a known model ({', '.join(sorted(KNOWN_MODELS))}),"
                f" an hf:ORG/NAME reference, or a reference an installed backend accepts (tried: {tried})"
            )
        raise UnsupportedModelError(f"no installed backend can load {str(path)!r} (tried: {tried})", path=path)
    model = Model(
        handle, candidate, bundle=bundle, prefill_chunk_size=prefill_chunk_size, context_length=context_length
    )
    get_logger().info(
        "model.loaded",
        ref=str(ref),
        backend=candidate.name,
        device=handle.device,
        dtype=handle.dtype,
        load_s=round(time.perf_counter() - started, 4),
    )
    return model


#: Tokens of the sequence :attr:`Model.kv_bytes_per_token` measures.
_KV_PROBE_TOKENS: Final = 8


@final
@dataclass(frozen=True, slots=True)
class PreparedRequest:
    """A request checked and tokenized by :meth:`Model.prepare`, ready to run on that model.

    Pass it to :meth:`Model.stream`, :meth:`~Model.astream`, :meth:`~Model.generate` or
    :meth:`~Model.agenerate` in place of a prompt: it is not checked again. A server prepares
    a request where it arrives (errors become its 400s) and runs it once admitted. The fields
    are derived from one another: to change the prompt, the sampling or an option, prepare
    again; ``dataclasses.replace`` suits ``timeout`` and a ``params`` that differs only in
    ``seed``. Whatever is given, the model refuses to run a request that does not fit it.
    """

    #: The prompt's token ids, all inside the model's vocabulary.
    prompt_ids: tuple[int, ...]
    #: The sampling parameters, checked against the model's vocabulary (with the output
    #: constraint compiled from ``response_format``, if any).
    params: SamplingParams
    #: Most tokens the request generates: ``params.max_tokens`` cut to the room the prompt
    #: leaves in the context (what its KV cache is sized for).
    max_new_tokens: int
    #: Seconds the whole request may take from when it starts running (``None``: no limit).
    timeout: float | None = None
    #: The tool-call format its output is parsed with (``None``: no tools in play).
    tool_format: ToolFormat | None = None
    #: Whether it drafts tokens by prompt lookup and verifies them (see :mod:`infer.speculative`).
    speculative: bool = False

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise EmptyPromptError("the prompt has no tokens; give non-empty text, messages or token ids")
        _check_timeout(self.timeout)


_PREPARED_ALONE: Final = "nothing else beside a PreparedRequest (its options were fixed when it was prepared)"

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _runs_prepared(
    prepare: Callable[Concatenate[Model, _P], PreparedRequest],
) -> Callable[[Callable[[Model, PreparedRequest], _R]], Callable[Concatenate[Model, _P], _R]]:
    """Give a method that runs a :class:`PreparedRequest` the arguments of ``prepare``.

    The four ways to run a request (stream, astream, generate, agenerate) so share one
    definition of what a request is: ``Model.prepare``'s signature, which ``help()`` and
    ``inspect`` show for each. A coroutine function stays one (its errors come when awaited).
    """

    def decorate(run: Callable[[Model, PreparedRequest], _R]) -> Callable[Concatenate[Model, _P], _R]:
        if inspect.iscoroutinefunction(run):

            @functools.wraps(run)
            async def run_async(self: Model, /, *args: _P.args, **kwargs: _P.kwargs) -> Any:
                return await cast("Any", run(self, prepare(self, *args, **kwargs)))

            method = cast("Callable[Concatenate[Model, _P], _R]", run_async)
        else:

            @functools.wraps(run)
            def run_sync(self: Model, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
                return run(self, prepare(self, *args, **kwargs))

            method = run_sync
        returns = inspect.signature(run).return_annotation
        method.__signature__ = inspect.signature(prepare).replace(return_annotation=returns)  # type: ignore[attr-defined]
        return method

    return decorate


def _check_timeout(timeout: object) -> None:
    if timeout is not None and (
        not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout > 0 or timeout == float("inf")
    ):
        raise InvalidParameterError("timeout", timeout, "a positive finite number of seconds or None")


def _template_kwargs(value: object) -> dict[str, Any]:
    """``chat_template_kwargs``: template variables by name."""
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise InvalidParameterError("chat_template_kwargs", value, "a mapping of variable names to values, or None")
    return dict(value)


def _max_prompt_bytes(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidParameterError("max_prompt_bytes", value, "a positive number of bytes")
    return value


class Model:
    """A loaded model. Thread-safe: many streams may run on it at once, from threads or asyncio."""

    def __init__(
        self,
        handle: ModelHandle,
        backend: Backend,
        *,
        bundle: Bundle | None = None,
        prefill_chunk_size: int = 256,
        context_length: int | None = None,
    ) -> None:
        self._handle = handle
        self._backend = backend
        self._bundle = bundle
        tok = handle.tokenizer
        if tok is not None:
            self.tokenizer = Tokenizer(tok)
        elif bundle is not None:
            self.tokenizer = Tokenizer.from_file(bundle.tokenizer_path)
        else:
            raise ModelError(f"backend {handle.backend!r} returned a model without a tokenizer, and there is no bundle")
        eos = handle.eos_token_ids if handle.eos_token_ids is not None else (bundle.eos_token_ids if bundle else ())
        #: Token ids that end generation.
        self.eos_token_ids: frozenset[int] = frozenset(eos)
        #: The chat template, if the model has one.
        self.chat_template: str | None = handle.chat_template or (bundle.chat_template if bundle else None)
        if self.chat_template is not None:
            _check_chat_template(self.chat_template, bundle)
        #: Most tokens one sequence may hold.
        self.context_length = min(context_length or handle.context_length, handle.context_length)
        #: Longest prompt text accepted, in UTF-8 bytes: no longer text can fit the context, so
        #: longer text is refused before it is tokenized (:class:`~infer.errors.PromptTooLongError`).
        self.max_prompt_bytes = self.context_length * max(4, self.tokenizer.max_token_bytes)
        self._engine = Engine(
            handle,
            backend.hooks,
            max_batch_size=backend.info.max_batch_size,
            prefill_chunk_size=prefill_chunk_size,
            capabilities=usable_capabilities(backend.info, handle),
        )
        self._closed = False
        self._grammars: TokenizerGrammars | None = None
        #: Whether requests speculate unless they say otherwise (``infer.load(speculative=...)``).
        self.speculative = False
        self._kv_bytes_per_token: float | None = None

    # -- facts --------------------------------------------------------------------------------

    @property
    def prefix_cache_stats(self) -> PrefixStats | None:
        """Lookups, hits, hit rate, cached tokens and evictions of the prefix cache (``None`` when off)."""
        cache = self._engine.prefix_cache
        return None if cache is None else cache.stats

    @property
    def backend(self) -> str:
        """Name of the backend running the model."""
        return self._handle.backend

    @property
    def info(self) -> BackendInfo:
        """What the backend declared about itself."""
        return self._backend.info

    @property
    def device(self) -> str:
        """Device the model runs on."""
        return self._handle.device

    @property
    def dtype(self) -> str:
        """Precision the model computes in."""
        return self._handle.dtype

    @property
    def logits_atol(self) -> float:
        """Max logit difference this model guarantees between equivalent computations."""
        own = self._handle.logits_atol
        return self._backend.info.logits_atol if own is None else own

    @property
    def vocab_size(self) -> int:
        """Number of logits per token."""
        return self._handle.vocab_size

    @property
    def handle(self) -> ModelHandle:
        """The backend's handle (for conformance tests and backend-specific inspection)."""
        return self._handle

    @property
    def kv_bytes_per_token(self) -> float:
        """Bytes of KV cache one token takes on this model, measured once on a filled probe sequence.

        A sequence's memory is its capacity (not its length) times this: what a server admits
        against its KV budget. The probe holds :data:`_KV_PROBE_TOKENS` tokens, filled to its capacity,
        so a cache sized by capacity and one sized by length measure alike.
        """
        if self._kv_bytes_per_token is None:
            tokens = min(_KV_PROBE_TOKENS, self.context_length)
            seq = self.new_sequence(tokens)
            try:
                self.run_prefill([seq], [[0] * tokens])
                self._kv_bytes_per_token = seq.nbytes / max(seq.capacity, 1)
            finally:
                seq.release()
        return self._kv_bytes_per_token

    @property
    def active_requests(self) -> int:
        """Requests queued or running."""
        return self._engine.active_requests

    # -- text ---------------------------------------------------------------------------------

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``."""
        return self.tokenizer.decode(ids)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        timeout: float | None = None,
        **template_kwargs: Any,
    ) -> str:
        """Render chat ``messages`` into the prompt text the model was trained on.

        ``template_kwargs`` reach the template as variables (``enable_thinking=False``...). The
        render runs under :mod:`infer.chat`'s budget, cut to ``timeout`` seconds when that is
        shorter; a template that runs past it raises :class:`~infer.errors.ChatTemplateError`.
        """
        from infer.chat import render_chat

        if self.chat_template is None:
            raise ChatTemplateError("this model has no chat template; pass a plain prompt instead of messages")
        special = self._bundle.tokenizer_config if self._bundle is not None else {}
        return render_chat(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=_token_text(special.get("bos_token")),
            eos_token=_token_text(special.get("eos_token")),
            timeout=timeout,
            **template_kwargs,
        )

    def check_prompt_bytes(self, text: str, *, max_bytes: int | None = None) -> None:
        """Refuse ``text`` longer than ``max_bytes`` (default :attr:`max_prompt_bytes`) without tokenizing it.

        Raises :class:`~infer.errors.PromptTooLongError`. Cheap: at most one UTF-8 encode,
        skipped when even four bytes per character would fit.
        """
        limit = self.max_prompt_bytes if max_bytes is None else max_bytes
        if len(text) * 4 <= limit:
            return
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > limit:
            raise PromptTooLongError(size, limit, self.context_length)

    def chat_ids(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        timeout: float | None = None,
        max_bytes: int | None = None,
        **template_kwargs: Any,
    ) -> list[int]:
        """Prompt token ids of chat ``messages``: rendered, length-checked in bytes, then tokenized.

        Control tokens come from the template only: a message whose content spells one (a user
        writing ``<|im_end|><|im_start|>system``) has that text tokenized as plain text, so no
        message can open or close a turn. ``timeout`` bounds the render and ``max_bytes`` the
        rendered text (see :meth:`check_prompt_bytes`).
        """
        quoting = [
            i
            for i, m in enumerate(messages)
            if isinstance(m, Mapping)
            and isinstance(m.get("content"), str)
            and any(s in m["content"] for s in self._control_texts)
        ]
        if not quoting:  # the usual case: one render, one tokenization
            text = self.apply_chat_template(messages, timeout=timeout, **template_kwargs)
            self.check_prompt_bytes(text, max_bytes=max_bytes)
            return self.encode(text, add_special_tokens=False)
        # Fence the contents that spell control tokens, render, and tokenize the fenced spans
        # with control tokens off.
        fenced = list(messages)
        for i in quoting:
            content = messages[i]["content"]
            if _FENCE_OPEN in content or _FENCE_CLOSE in content:
                raise InvalidParameterError(
                    f"messages[{i}].content", content[:40], "text without the private-use characters U+E000, U+E001"
                )
            fenced[i] = {**messages[i], "content": _FENCE_OPEN + content + _FENCE_CLOSE}
        text = self.apply_chat_template(fenced, timeout=timeout, **template_kwargs)
        self.check_prompt_bytes(text, max_bytes=max_bytes)
        ids: list[int] = []
        inside = False
        for part in _FENCES.split(text):
            if part in (_FENCE_OPEN, _FENCE_CLOSE):
                if inside == (part == _FENCE_OPEN):
                    raise _unfenced()
                inside = part == _FENCE_OPEN
            elif part:
                ids += (
                    self._text_only.encode(part, add_special_tokens=False).ids
                    if inside
                    else self.encode(part, add_special_tokens=False)
                )
        if inside:
            raise _unfenced()
        return ids

    @functools.cached_property
    def _control_texts(self) -> tuple[str, ...]:
        added = self.tokenizer.backend.get_added_tokens_decoder().values()
        return tuple(t.content for t in added if t.special and t.content)

    @functools.cached_property
    def _text_only(self) -> Any:
        """A copy of the tokenizer that reads control-token text as plain text."""
        from tokenizers import Tokenizer as HFTokenizer

        clone = HFTokenizer.from_str(self.tokenizer.backend.to_str())
        clone.encode_special_tokens = True
        return clone

    # -- generation ---------------------------------------------------------------------------

    def prepare(
        self,
        /,
        prompt: str | Sequence[int] | PreparedRequest | None = None,
        *,
        messages: Sequence[Mapping[str, Any]] | None = None,
        params: SamplingParams | None = None,
        timeout: float | None = None,
        **options: Any,
    ) -> PreparedRequest:
        """Check and tokenize a request: the one place a request is validated before it runs.

        Give exactly one of ``prompt`` (text or token ids) and ``messages`` (chat). Sampling
        options come as ``params`` and/or keyword arguments (``max_tokens=``, ``temperature=``...),
        checked once, against this model's vocabulary too. ``timeout`` (seconds) bounds the whole
        request (and the chat template's render). Other ``options``: ``response_format`` (compiled
        into an output constraint, see :meth:`compile_response_format`), ``tools`` and
        ``tool_choice`` (see :mod:`infer.tools`), ``speculative`` (``"ngram"``, ``"auto"``, ``"off"``;
        default :attr:`speculative`), ``chat_template_kwargs`` (variables for the chat template) and
        ``max_prompt_bytes`` (refuse longer prompt text before tokenizing it; default
        :attr:`max_prompt_bytes`). A :class:`PreparedRequest` given as ``prompt``, alone, is
        returned as it is. :meth:`stream`, :meth:`astream`, :meth:`generate` and :meth:`agenerate`
        take exactly these arguments and call this.

        Raises a :class:`~infer.errors.RequestError` naming what is wrong: an
        :class:`~infer.errors.InvalidParameterError` (its ``parameter`` is the keyword at fault),
        :class:`~infer.errors.EmptyPromptError`, :class:`~infer.errors.InvalidTokenError`,
        :class:`~infer.errors.ContextLengthError` (the prompt leaves no room to generate) or
        :class:`~infer.errors.ChatTemplateError`; :class:`~infer.errors.ModelClosedError` once closed.
        """
        if isinstance(prompt, PreparedRequest):
            given = {"messages": messages, "params": params, "timeout": timeout}
            extra = sorted(k for k, v in given.items() if v is not None) + sorted(options)
            if extra:
                raise InvalidParameterError(extra[0], given.get(extra[0], options.get(extra[0])), _PREPARED_ALONE)
            return prompt
        self._check_open()
        tool_format = None
        template_kwargs = _template_kwargs(options.pop("chat_template_kwargs", None))
        if "tools" in options or "tool_choice" in options:
            messages, tool_format, template_vars = self._plan_tools(messages, options)
            template_kwargs = {**template_kwargs, **template_vars}
        if "response_format" in options:
            options["constraint"] = self.compile_response_format(options.pop("response_format"))
        speculate = self._speculation(options.pop("speculative")) if "speculative" in options else self.speculative
        max_bytes = _max_prompt_bytes(options.pop("max_prompt_bytes")) if "max_prompt_bytes" in options else None
        unknown = sorted(set(options) - _SAMPLING_FIELDS)
        if unknown:
            raise InvalidParameterError(unknown[0], options[unknown[0]], f"one of {sorted(_SAMPLING_FIELDS)}")
        # Built once (a given params is used as it is): construction is the check of every field.
        if options:
            params = replace(params, **options) if params is not None else SamplingParams(**options)
        elif params is None:
            params = SamplingParams()
        params.validate(self.vocab_size)
        _check_timeout(timeout)  # before the render, which it bounds
        ids = self._prompt_ids(prompt, messages, timeout, template_kwargs, max_bytes)
        return PreparedRequest(
            tuple(ids),
            params,
            max_new_tokens=self._max_new_tokens(len(ids), params),
            timeout=timeout,
            tool_format=tool_format,
            speculative=speculate,
        )

    @_runs_prepared(prepare)
    def stream(self, request: PreparedRequest) -> TokenStream:
        """Start generating; iterate the returned stream for :class:`TokenEvent` objects.

        Takes the arguments of :meth:`prepare` (or a request it prepared): exactly one of ``prompt``
        (text or token ids) and ``messages`` (chat), sampling options as ``params`` and/or keyword
        arguments (``max_tokens=``, ``temperature=``...). ``timeout`` (seconds) bounds the whole
        request: past it the stream raises :class:`DeadlineExceededError`. Closing, leaving or
        dropping the stream cancels the request.
        """
        return TokenStream(self, self._start(request))

    @_runs_prepared(prepare)
    def astream(self, request: PreparedRequest) -> AsyncTokenStream:
        """The asyncio twin of :meth:`stream`: ``async for event in model.astream(...)``."""
        return AsyncTokenStream(self, self._start(request))

    @_runs_prepared(prepare)
    def generate(self, request: PreparedRequest) -> Completion:
        """Generate to the end and return the :class:`Completion` (arguments: those of :meth:`prepare`)."""
        # No per-token events: the scheduler hands over only the final result (no thread hop per token).
        return TokenStream(self, self._start(request, stream_events=False)).result()

    @_runs_prepared(prepare)
    async def agenerate(self, request: PreparedRequest) -> Completion:
        """The asyncio twin of :meth:`generate`."""
        return await AsyncTokenStream(self, self._start(request, stream_events=False)).result()

    def stream_choices(
        self,
        prompt: str | Sequence[int] | Sequence[PreparedRequest] | None = None,
        *,
        params: Sequence[SamplingParams] | None = None,
        messages: Sequence[Mapping[str, Any]] | None = None,
        timeout: float | None = None,
        **options: Any,
    ) -> list[TokenStream]:
        """One stream per entry of ``params``, all continuing the same prompt (``n`` choices).

        Where the backend declares the ``fork`` capability (contract 1.1) the prompt is prefilled
        once: the other choices fork the first one's cache and sample from its last logits.
        ``options`` apply to every choice, as :meth:`stream`'s keyword arguments do. Requests
        already prepared (:meth:`prepare`) may be given as ``prompt`` instead, alone.
        """
        prepared = self._prepare_choices(prompt, params, messages, timeout, options)
        return [TokenStream(self, r) for r in self._start_choices(prepared)]

    def astream_choices(
        self,
        prompt: str | Sequence[int] | Sequence[PreparedRequest] | None = None,
        *,
        params: Sequence[SamplingParams] | None = None,
        messages: Sequence[Mapping[str, Any]] | None = None,
        timeout: float | None = None,
        **options: Any,
    ) -> list[AsyncTokenStream]:
        """The asyncio twin of :meth:`stream_choices`."""
        prepared = self._prepare_choices(prompt, params, messages, timeout, options)
        return [AsyncTokenStream(self, r) for r in self._start_choices(prepared)]

    def _prepare_choices(
        self,
        prompt: str | Sequence[int] | Sequence[PreparedRequest] | None,
        params: Sequence[SamplingParams] | None,
        messages: Sequence[Mapping[str, Any]] | None,
        timeout: float | None,
        options: Mapping[str, Any],
    ) -> list[PreparedRequest]:
        """The choices' prepared requests: the given ones, or one per ``params`` entry."""
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, PreparedRequest) for p in prompt):
            given = {"params": params, "messages": messages, "timeout": timeout}
            extra = sorted(k for k, v in given.items() if v is not None) + sorted(options)
            if extra:
                raise InvalidParameterError(extra[0], given.get(extra[0], options.get(extra[0])), _PREPARED_ALONE)
            return list(cast("Sequence[PreparedRequest]", prompt))
        if params is None or isinstance(params, SamplingParams) or not params:
            raise InvalidParameterError("params", params, "a non-empty list of SamplingParams, one per choice")
        text = cast("str | Sequence[int] | None", prompt)
        return [self.prepare(text, messages=messages, params=p, timeout=timeout, **options) for p in params]

    def _start_choices(self, prepared: Sequence[PreparedRequest]) -> list[Request]:
        """Start the choices together, each after the first forking its cache where it can."""
        requests: list[Request] = []
        # The scheduler sees the choices only once they are linked, so none prefills on its own.
        with self._engine.holding():
            try:
                for choice in prepared:
                    requests.append(self._start(choice))
            except BaseException:
                for request in requests:
                    self._engine.cancel(request)
                raise
            if Capability.FORK in self._engine.capabilities:
                first = requests[0]
                for request in requests[1:]:
                    if np.array_equal(request.prompt, first.prompt):
                        request.parent = first
        return requests

    def _start(self, prepared: PreparedRequest, *, stream_events: bool = True) -> Request:
        """Hand a prepared request to the scheduler."""
        self._check_open()
        ids = prepared.prompt_ids
        if not 1 <= prepared.max_new_tokens <= self.context_length - len(ids):
            # Only a request built or changed by hand gets here: Model.prepare sized it to fit.
            raise ContextLengthError(len(ids) + prepared.max_new_tokens, self.context_length)
        request = Request(
            np.asarray(ids, dtype=np.int32),
            prepared.params,
            vocab_size=self.vocab_size,
            max_new=prepared.max_new_tokens,
            eos_ids=self.eos_token_ids,
            tokenizer=self.tokenizer,
            timeout=None if prepared.timeout is None else float(prepared.timeout),
            channel=Channel(STREAM_BUFFER, self._engine.wake),
            stream_events=stream_events,
        )
        request.tool_format = prepared.tool_format
        if prepared.speculative:
            request.drafter = NgramDrafter()
            if Capability.DRAFT in self._engine.capabilities:
                request.step_drafter = StepDrafter()
        self._engine.submit(request)
        return request

    def _check_open(self) -> None:
        if self._closed:
            from infer.errors import ModelClosedError

            raise ModelClosedError("the model is closed; load it again to generate")

    def _max_new_tokens(self, prompt_tokens: int, params: SamplingParams) -> int:
        """Tokens a request may generate: ``max_tokens`` cut to the room its prompt leaves in the context."""
        room = self.context_length - prompt_tokens
        if room < 1:
            raise ContextLengthError(prompt_tokens, self.context_length)
        return room if params.max_tokens is None else min(params.max_tokens, room)

    def _plan_tools(
        self, messages: Sequence[Mapping[str, Any]] | None, options: dict[str, Any]
    ) -> tuple[Sequence[Mapping[str, Any]] | None, ToolFormat | None, dict[str, Any]]:
        """Take ``tools``/``tool_choice`` out of ``options``: the messages, call format and template variables."""
        from infer.tools import plan_tools

        messages, tool_format, template_vars, response_format = plan_tools(
            self.chat_template,
            messages,
            options.pop("tools", None),
            options.pop("tool_choice", None),
            options.get("response_format"),
        )
        if response_format is not None:
            options["response_format"] = response_format
        return messages, tool_format, template_vars

    def compile_response_format(self, response_format: object) -> Constraint | None:
        """Compile a ``response_format`` (JSON schema, Pydantic model, regex, grammar) for this model.

        Returns the :class:`~infer.structured.Constraint` to pass as ``SamplingParams(constraint=...)``,
        or ``None`` for plain text; ``generate``/``stream`` accept ``response_format=`` and call
        this. Raises :class:`~infer.errors.GrammarError` naming what does not compile.
        """
        from infer.structured import TokenizerGrammars, use_constraints

        if self._grammars is None:
            self._grammars = TokenizerGrammars(self.tokenizer.backend, self.vocab_size, sorted(self.eos_token_ids))
        constraint = self._grammars.compile(response_format)
        if constraint is not None:
            use_constraints(self._backend.hooks.pm)
        return constraint

    def _prompt_ids(
        self,
        prompt: str | Sequence[int] | None,
        messages: Sequence[Mapping[str, Any]] | None,
        timeout: float | None,
        template_kwargs: Mapping[str, Any],
        max_bytes: int | None,
    ) -> list[int]:
        if (prompt is None) == (messages is None):
            raise InvalidParameterError("prompt", prompt, "exactly one of prompt= and messages=")
        if messages is not None:
            ids = self.chat_ids(messages, timeout=timeout, max_bytes=max_bytes, **template_kwargs)
        elif isinstance(prompt, str):
            self.check_prompt_bytes(prompt, max_bytes=max_bytes)
            ids = self.encode(prompt)
        else:
            ids = _check_ids(prompt, self.vocab_size)
        return ids

    # -- low-level access (conformance tests, backend authors) --------------------------------

    def new_sequence(self, capacity: int) -> KVCache:
        """A fresh backend cache for ``capacity`` tokens (low-level API)."""
        if not isinstance(capacity, int) or not 1 <= capacity <= self.context_length:
            raise InvalidParameterError("capacity", capacity, f"an integer in [1, {self.context_length}]")
        with self._engine.step_lock:
            return self._handle.new_sequence(capacity)

    def run_prefill(self, sequences: Sequence[KVCache], tokens: Sequence[Sequence[int]]) -> npt.NDArray[np.float32]:
        """Run the backend's prefill on raw token rows; return last-token logits ``[B, vocab]``."""
        return self._engine.step("prefill", self._batch(sequences, tokens))

    def run_decode(self, sequences: Sequence[KVCache], tokens: Sequence[int]) -> npt.NDArray[np.float32]:
        """Run one decode step, one token per sequence; return logits ``[B, vocab]``."""
        return self._engine.step("decode", self._batch(sequences, [[t] for t in tokens]))

    def run_prefill_all(
        self, sequences: Sequence[KVCache], tokens: Sequence[Sequence[int]]
    ) -> tuple[npt.NDArray[np.float32], ...]:
        """Prefill raw token rows; return every position's logits, one ``[n_i, vocab]`` array per row.

        Needs :attr:`Capability.ALL_LOGITS` (contract 1.1); raises :class:`BackendError` without it.
        """
        return self._engine.step_all(self._batch(sequences, tokens))

    def run_draft(self, sequences: Sequence[KVCache], tokens: Sequence[int]) -> npt.NDArray[np.float32]:
        """One draft step, one token per sequence: approximate logits ``[B, vocab]``. The drafted
        positions must be truncated away and fed again before they count.

        Needs :attr:`Capability.DRAFT` (contract 1.3); raises :class:`BackendError` without it.
        """
        return self._engine.step_draft(self._batch(sequences, [[t] for t in tokens]))

    @property
    def capabilities(self) -> frozenset[Capability]:
        """What this model can do: its backend's declared capabilities, narrowed to this model's."""
        return self._engine.capabilities

    def truncate(self, sequence: KVCache, length: int) -> None:
        """Roll ``sequence`` back to its first ``length`` tokens (needs :attr:`Capability.TRUNCATE`)."""
        self._check_live(sequence)
        if not isinstance(length, int) or isinstance(length, bool) or not 0 <= length <= sequence.length:
            raise InvalidParameterError("length", length, f"an integer in [0, {sequence.length}]")
        self._engine.truncate(sequence, length)

    def fork(self, sequence: KVCache, length: int, capacity: int | None = None) -> KVCache:
        """A new cache holding ``sequence``'s first ``length`` tokens, for ``capacity`` tokens
        (default: ``sequence.capacity``). Needs :attr:`Capability.FORK`."""
        self._check_live(sequence)
        if not isinstance(length, int) or isinstance(length, bool) or not 1 <= length <= sequence.length:
            raise InvalidParameterError("length", length, f"an integer in [1, {sequence.length}]")
        capacity = sequence.capacity if capacity is None else capacity
        if not isinstance(capacity, int) or not length <= capacity <= self.context_length:
            raise InvalidParameterError("capacity", capacity, f"an integer in [{length}, {self.context_length}]")
        return self._engine.fork(sequence, length, capacity)

    def _speculation(self, mode: object) -> bool:
        """Whether a request with ``speculative=mode`` speculates; refuse a mode this backend cannot run."""
        if mode not in MODES:
            raise InvalidParameterError("speculative", mode, f"one of {list(MODES)}")
        able = {Capability.TRUNCATE, Capability.ALL_LOGITS} <= self._engine.capabilities
        if mode == "ngram" and not able:
            raise InvalidParameterError(
                "speculative",
                mode,
                f"'auto' or 'off': backend {self.backend!r} lacks the 'truncate' and 'all_logits' capabilities",
            )
        if mode == "auto":
            # Speculation gives the plain tokens only as far as verification logits equal decode
            # logits: where the model allows them to differ by more (int4: 1.5), "auto" stays off.
            return able and self.logits_atol <= AUTO_SPECULATION_ATOL
        return mode == "ngram"

    @staticmethod
    def _check_live(sequence: KVCache) -> None:
        if not isinstance(sequence, KVCache) or sequence.released:
            raise InvalidParameterError("sequence", sequence, "a cache that has not been released")

    def _batch(self, sequences: Sequence[KVCache], tokens: Sequence[Sequence[int]]) -> Batch:
        rows = [_check_ids(row, self.vocab_size) for row in tokens]
        for seq, row in zip(sequences, rows, strict=False):
            if not row:
                raise EmptyPromptError("every row of a batch needs at least one token")
            if seq.released:
                raise InvalidParameterError("sequences", seq, "caches that have not been released")
            if seq.length + len(row) > seq.capacity:
                raise ContextLengthError(seq.length + len(row), seq.capacity)
        return Batch(tuple(sequences), token_rows(rows))

    # -- lifetime -----------------------------------------------------------------------------

    def close(self) -> None:
        """Cancel running requests and free the backend's resources. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._engine.close()
        self._handle.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<infer.Model backend={self.backend!r} device={self.device!r} dtype={self.dtype!r}>"


# Private-use characters fencing message contents while a chat is rendered (see Model.chat_ids).
_FENCE_OPEN, _FENCE_CLOSE = "\ue000", "\ue001"
_FENCES = re.compile("([\ue000\ue001])")


def _unfenced() -> ChatTemplateError:
    return ChatTemplateError(
        "a message quotes a control token and this model's chat template rewrites message contents, so it "
        "cannot be kept as plain text; remove the control-token text from the message"
    )


def _check_chat_template(template: str, bundle: Bundle | None) -> None:
    """Refuse at load a chat template that does not compile or runs past its budget on one message."""
    from infer.chat import check_template

    try:
        check_template(template)
    except ChatTemplateError as exc:
        where = bundle.path if bundle is not None else None
        raise ModelFormatError(
            f"the model's chat template is unusable: {exc}. Fix or remove chat_template.jinja / the "
            "chat_template field of tokenizer_config.json (or re-download the model)",
            path=where,
        ) from exc


def _token_text(value: object) -> str:
    if isinstance(value, Mapping):
        value = value.get("content", "")
    return value if isinstance(value, str) else ""


def _check_ids(ids: object, vocab_size: int) -> list[int]:
    if isinstance(ids, np.ndarray):
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise InvalidParameterError("prompt", ids, "a 1-D array of integer token ids")
        values = ids.tolist()
    elif isinstance(ids, Sequence) and not isinstance(ids, (str, bytes)):
        values = list(ids)
    else:
        raise InvalidParameterError("prompt", ids, "text, or a sequence of integer token ids")
    for position, token in enumerate(values):
        if not isinstance(token, (int, np.integer)) or isinstance(token, bool):
            raise InvalidParameterError("prompt", token, f"an integer token id at position {position}")
        if not 0 <= token < vocab_size:
            raise InvalidTokenError(int(token), vocab_size, position)
    return [int(t) for t in values]


class _StreamBase:
    """What the sync and async streams share: the request, cancellation on drop, the result."""

    def __init__(self, model: Model, request: Request) -> None:
        self._model = model
        self._request = request
        self._engine = model._engine
        self._finished = False
        #: The final :class:`Completion`, once the stream is exhausted.
        self.completion: Completion | None = None
        # Dropping the stream without finishing it cancels the request (weakref: no cycle).
        self._finalizer = weakref.finalize(self, self._engine.cancel, request)

    @property
    def request_id(self) -> str:
        """The request's id (as in the log events)."""
        return self._request.id

    def _remaining(self) -> float | None:
        deadline = self._request.deadline
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    def _handle(self, item: object) -> TokenEvent:
        if isinstance(item, TokenEvent):
            return item
        self._finished = True
        self._finalizer.detach()
        if isinstance(item, Done):
            from infer.tools import with_tool_calls

            self.completion = with_tool_calls(item.completion, self._request.tool_format)  # type: ignore[arg-type]
            raise StopIteration
        assert isinstance(item, Failed)
        raise item.error

    def _expire(self) -> DeadlineExceededError:
        self._finished = True
        self._finalizer()
        timeout = self._request.timeout
        assert timeout is not None
        return DeadlineExceededError(timeout, len(self._request.generated))

    def _cancel(self) -> None:
        if not self._finished:
            self._finished = True
            self._finalizer()


@final
class TokenStream(_StreamBase):
    """Iterator over a request's :class:`TokenEvent` objects; ``.completion`` once done.

    ``close()`` it, leave the ``with`` block or the ``for`` loop, or drop it, and the request
    stops before the backend's next step.
    """

    def __next__(self) -> TokenEvent:
        if self._finished:
            raise StopIteration
        try:
            item = self._request.channel.get(self._remaining())
        except queue.Empty:
            raise self._expire() from None
        return self._handle(item)

    def __iter__(self) -> Iterator[TokenEvent]:
        try:
            while True:
                try:
                    event = next(self)
                except StopIteration:
                    return
                yield event
        finally:
            self._cancel()

    def result(self) -> Completion:
        """Consume the rest of the stream and return the completion."""
        for _ in self:
            pass
        if self.completion is None:
            raise RequestCancelledError(f"request {self.request_id} was cancelled before it finished")
        return self.completion

    def close(self) -> None:
        """Cancel the request if it is still running."""
        self._cancel()

    def __enter__(self) -> TokenStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@final
class AsyncTokenStream(_StreamBase):
    """Async iterator over a request's :class:`TokenEvent` objects; cancelling the task cancels it."""

    def __aiter__(self) -> AsyncIterator[TokenEvent]:
        return self

    async def __anext__(self) -> TokenEvent:
        if self._finished:
            raise StopAsyncIteration
        try:
            item = await self._request.channel.aget(self._remaining())
        except TimeoutError:
            raise self._expire() from None
        except BaseException:
            self._cancel()  # task cancelled (CancelledError) or interrupted
            raise
        try:
            return self._handle(item)
        except StopIteration:
            raise StopAsyncIteration from None

    async def result(self) -> Completion:
        """Consume the rest of the stream and return the completion."""
        try:
            async for _ in self:
                pass
        finally:
            self._cancel()
        if self.completion is None:
            raise RequestCancelledError(f"request {self.request_id} was cancelled before it finished")
        return self.completion

    async def aclose(self) -> None:
        """Cancel the request if it is still running."""
        self._cancel()

    async def __aenter__(self) -> AsyncTokenStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._cancel()
