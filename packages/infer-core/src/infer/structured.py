"""Structured output: sampling constrained to a JSON schema, a regular expression or a grammar.

A request's ``response_format`` is compiled once, against the model's tokenizer, into a
:class:`Constraint` that rides on its :class:`~infer.sampling.SamplingParams`. The
:class:`ConstrainedSampler` plugin wraps ``infer_sample`` (a ``wrapper=True`` hookimpl), so it
works on every backend without touching them: before each draw it sets the row's
:attr:`~infer.sampling.SamplerState.token_mask` to the tokens the grammar allows next (the
sampling chain bans the others before penalties, top-k and top-p), and after the draw it feeds
the chosen token to the row's matcher. The end-of-sequence tokens are allowed exactly when the
output is complete, so a constrained request ends by the model's own stop rule.

The grammar engine is llguidance (JSON schema, regular expressions, Lark and GBNF grammars). On
SmolLM2's 49,152-token vocabulary a mask takes ~11 us (median, a JSON schema of three fields),
a schema compiles in ~8 ms, and wrapping the model's tokenizer costs ~1 s once per model
(benchmarks/bench_structured.py has the same-run figures). llguidance is imported only when a
request asks for structured output.

Accepted ``response_format`` values (the OpenAI shapes, plus Python conveniences):

* ``{"type": "text"}`` or ``None``: unconstrained;
* ``{"type": "json_object"}``: any JSON object (OpenAI's JSON mode);
* ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}``; with
  ``strict`` objects admit only the keys they list, as in OpenAI's strict mode;
* a JSON schema itself (a ``dict`` whose ``type`` is a JSON-schema type, or with ``properties``,
  ``$ref``, ``anyOf``...), or a Pydantic model class (its ``model_json_schema()``, read strictly);
* ``{"type": "regex", "pattern": "..."}`` and ``{"type": "grammar", "grammar": "..."}`` (Lark
  or GBNF, as llama.cpp's grammars are written).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, final

import numpy as np
import numpy.typing as npt

from infer.errors import BackendError, GrammarError
from infer.hookspecs import hookimpl
from infer.sampling.chain import _LOGITS_SOURCE

if TYPE_CHECKING:
    from collections.abc import Generator

    from llguidance import LLMatcher, LLTokenizer
    from tokenizers import Tokenizer

    from infer.plugins import PluginManager
    from infer.sampling import SamplerState, SamplingParams

__all__ = [
    "ConstrainedSampler",
    "Constraint",
    "TokenizerGrammars",
    "grammar_source",
    "strict_schema",
    "use_constraints",
]

#: JSON is generated compactly, with the separators ``json.dumps`` uses by default: small models
#: wander into runs of whitespace when a grammar allows it anywhere.
_JSON_OPTIONS: Final = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
#: Key of the per-request matcher in :attr:`SamplerState.extras`.
_MATCHER: Final = "infer.structured"
#: Serialises :func:`use_constraints` (two first requests may race to register the plugin).
_REGISTERING: Final = threading.Lock()
#: ``type`` values that name a response format rather than a JSON-schema type.
_FORMAT_TYPES: Final = frozenset({"text", "json_object", "json_schema", "regex", "grammar"})


def grammar_source(response_format: object) -> tuple[str, str] | None:
    """The kind (``"json_schema"``, ``"regex"``, ``"grammar"``) and text of a ``response_format``.

    ``None`` for unconstrained output. Raises :class:`GrammarError` for a value that is none of
    the accepted shapes (see the module docstring).
    """
    if response_format is None:
        return None
    schema_of = getattr(response_format, "model_json_schema", None)
    if isinstance(response_format, type) and callable(schema_of):
        # A class describes exactly its fields, as OpenAI's strict mode reads one.
        return "json_schema", _dumps(strict_schema(schema_of()))
    if not isinstance(response_format, Mapping):
        raise GrammarError(
            f"response_format must be a mapping or a Pydantic model class, not {type(response_format).__name__}"
        )
    kind = response_format.get("type")
    if kind not in _FORMAT_TYPES:
        # A JSON schema given directly (its "type" is a JSON type, or it has none).
        return "json_schema", _dumps(response_format)
    if kind == "text":
        return None
    if kind == "json_object":
        return "json_schema", '{"type": "object"}'
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, Mapping) else None
        if not isinstance(spec, Mapping) or not isinstance(schema, Mapping):
            raise GrammarError('response_format of type "json_schema" needs json_schema.schema, a JSON schema object')
        return "json_schema", _dumps(strict_schema(schema) if spec.get("strict") else schema)
    field = "pattern" if kind == "regex" else "grammar"
    text = response_format.get(field)
    if not isinstance(text, str) or not text:
        raise GrammarError(f'response_format of type "{kind}" needs a non-empty string {field!r}')
    return kind, text


def strict_schema(schema: Any) -> Any:
    """``schema`` with ``additionalProperties: false`` on every object that does not say otherwise.

    OpenAI's strict mode forbids keys a schema does not list; JSON Schema alone allows them, so
    a model would be free to wander into extra keys.
    """
    if isinstance(schema, Mapping):
        out = {key: strict_schema(value) for key, value in schema.items()}
        if ("properties" in out or out.get("type") == "object") and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict_schema(item) for item in schema]
    return schema


def _dumps(schema: Mapping[str, Any]) -> str:
    try:
        return json.dumps(schema)
    except (TypeError, ValueError) as exc:
        raise GrammarError(f"the JSON schema cannot be serialised as JSON: {exc}") from exc


@final
@dataclass(frozen=True, slots=True, eq=False)
class Constraint:
    """A compiled output grammar bound to one model's tokenizer; shared by the requests that use it.

    Made by :meth:`TokenizerGrammars.compile`; pass it as ``SamplingParams(constraint=...)``
    (``Model.generate(response_format=...)`` does so).
    """

    #: ``"json_schema"``, ``"regex"`` or ``"grammar"``.
    kind: str
    #: The grammar as llguidance compiled it.
    grammar: str
    #: The model's tokenizer as llguidance sees it.
    tokenizer: LLTokenizer
    #: Size of the logits rows the mask covers (the model's vocabulary).
    vocab_size: int

    def new_matcher(self) -> LLMatcher:
        """A fresh parser state for one request."""
        from llguidance import LLMatcher

        return LLMatcher(self.tokenizer, self.grammar, log_level=0)

    def allowed(self, matcher: LLMatcher) -> npt.NDArray[np.bool_]:
        """Which tokens may come next, as a bool row of :attr:`vocab_size` entries."""
        words = (self.vocab_size + 31) // 32
        bits = np.empty(words, dtype=np.int32)
        matcher.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)
        if matcher.is_error():
            raise BackendError(f"the output constraint failed: {matcher.get_error()}", backend=_LOGITS_SOURCE)
        return np.unpackbits(bits.view(np.uint8), bitorder="little", count=self.vocab_size).view(np.bool_)


class TokenizerGrammars:
    """Compiles response formats for one tokenizer; the tokenizer is wrapped once, on first use."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._eos = list(eos_token_ids)
        self._wrapped: LLTokenizer | None = None
        self._lock = threading.Lock()

    def _llg_tokenizer(self) -> LLTokenizer:
        with self._lock:
            if self._wrapped is None:
                from llguidance import LLTokenizer

                if not self._eos:
                    raise GrammarError("the model declares no end-of-sequence token, so constrained output cannot end")
                self._wrapped = LLTokenizer(self._tokenizer.to_str(), n_vocab=self._vocab_size, eos_token=self._eos)
            return self._wrapped

    def compile(self, response_format: object) -> Constraint | None:
        """The :class:`Constraint` for ``response_format``, or ``None`` when it asks for plain text.

        Raises :class:`GrammarError` naming the problem for a schema, regex or grammar that does
        not compile.
        """
        source = grammar_source(response_format)
        if source is None:
            return None
        kind, text = source
        from llguidance import LLMatcher, grammar_from

        try:
            if kind == "json_schema":
                grammar = LLMatcher.grammar_from_json_schema(text, defaults=_JSON_OPTIONS)  # type: ignore[arg-type]
            else:
                grammar = grammar_from("regex" if kind == "regex" else "grammar", text)
        except ValueError as exc:
            raise GrammarError(f"invalid {kind.replace('_', ' ')}: {exc}") from exc
        tokenizer = self._llg_tokenizer()
        problem = LLMatcher.validate_grammar(grammar, tokenizer)
        if problem and not problem.startswith("WARNING"):
            raise GrammarError(f"invalid {kind.replace('_', ' ')}: {problem.strip()}")
        return Constraint(kind=kind, grammar=grammar, tokenizer=tokenizer, vocab_size=self._vocab_size)


class ConstrainedSampler:
    """The plugin that applies :class:`Constraint` masks around whichever sampler runs.

    infer-core registers it next to the default sampler. Rows without a constraint pass through
    untouched; a backend that samples on its device must honour ``states[i].token_mask``.
    """

    @hookimpl(wrapper=True)
    def infer_sample(
        self,
        logits: npt.NDArray[np.float32],
        params: Sequence[SamplingParams],
        states: Sequence[SamplerState],
    ) -> Generator[None, npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """Mask each constrained row before the draw; advance its matcher by the chosen token after."""
        constrained = [i for i, p in enumerate(params) if p.constraint is not None]
        for i in constrained:
            constraint = params[i].constraint
            assert constraint is not None
            state = states[i]
            matcher = state.extras.get(_MATCHER)
            if matcher is None:
                matcher = state.extras[_MATCHER] = constraint.new_matcher()
            state.token_mask = constraint.allowed(matcher)
        try:
            chosen: npt.NDArray[np.int64] = yield
        finally:
            for i in constrained:
                states[i].token_mask = None
        for i in constrained:
            matcher = states[i].extras[_MATCHER]
            token = int(chosen[i])
            if not matcher.consume_token(token):
                raise BackendError(
                    f"the sampler chose token {token}, which the output constraint does not allow "
                    f"({matcher.get_error()}); an infer_sample implementation ignored SamplerState.token_mask",
                    backend=_LOGITS_SOURCE,
                )
        return chosen


def use_constraints(pm: PluginManager) -> None:
    """Register :class:`ConstrainedSampler` with ``pm`` once.

    Registered on the first constrained request rather than at start-up: with no wrapper on
    ``infer_sample`` the engine calls the sampler directly, skipping pluggy on every token.
    """
    with _REGISTERING:
        if pm.get_plugin(_MATCHER) is None:
            pm.register(ConstrainedSampler(), name=_MATCHER)
