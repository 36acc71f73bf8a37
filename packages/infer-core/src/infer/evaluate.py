"""``infer eval``: how much quality a precision keeps, measured the same way on every machine.

Two measurements on a loaded :class:`~infer.model.Model`:

* **perplexity** on fixed text that ships with every Python: the pydoc topic texts
  (:mod:`pydoc_data.topics`), sorted by topic name and joined, tokenized and cut into chunks of
  :data:`CHUNK_TOKENS` tokens, of which the first ``chunks`` are scored. Every chunk starts a
  fresh sequence; each token after the first is scored given the ones before it. A backend with
  the ``all_logits`` capability (contract 1.1) scores a chunk in one prefill that returns every
  position's logits; otherwise the contract returns each row's last-token logits only, and
  positions are scored one decode step at a time, all chunks batched together (one step scores
  one token of every chunk). The report names the way taken (``scoring``): on int4-style kernels
  whose many-row and one-row paths round differently, the two differ in the last digits.
* **greedy agreement** with a reference precision of the same model: fixed prompts are continued
  greedily by both, and the report gives how many leading tokens agree, on average, and the share
  of scored text positions where both rank the same token first.

The text and its cut are fixed, so perplexities of two precisions, or two backends, compare; a
different tokenizer makes different chunks, so perplexities of two models do not.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt

from infer.errors import InvalidParameterError

if TYPE_CHECKING:
    from infer.model import Model
    from infer.results import TokenEvent

__all__ = [
    "CHUNK_TOKENS",
    "PROMPTS",
    "EvalReport",
    "eval_chunks",
    "evaluate",
    "greedy_agreement",
    "perplexity",
    "prompt_logprobs",
    "scoring",
]

#: Tokens per scored chunk.
CHUNK_TOKENS: Final = 512
#: Chunks scored by default: about a minute for SmolLM2-135M at its own precision on two cores.
DEFAULT_CHUNKS: Final = 8
#: Prompts continued greedily by the model and its reference (chat prompts when the model has a template).
PROMPTS: Final = (
    "What is 2+2?",
    "Write a short story about a robot who learns to paint.",
    "Explain in two sentences why the sky is blue.",
    "List three uses of a paperclip.",
    "Translate 'good morning' into French and Spanish.",
    "def fibonacci(n):",
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
)
#: Tokens each prompt is continued by.
GREEDY_TOKENS: Final = 32


@dataclass(frozen=True, slots=True)
class EvalReport:
    """What :func:`evaluate` measured."""

    #: Precision evaluated, and the backend and device that ran it.
    dtype: str
    backend: str
    device: str
    #: Chunks scored, their length in tokens, and the predictions scored in all.
    chunks: int
    chunk_tokens: int
    scored_tokens: int
    #: exp(mean negative log-likelihood of each scored token).
    perplexity: float
    #: Seconds the perplexity pass took.
    seconds: float
    #: How positions were scored: ``"all_logits"`` (one prefill per chunk) or ``"decode"`` (a step per position).
    scoring: str = "decode"
    #: The reference precision, its perplexity on the same chunks, and the agreements (``None`` without a reference).
    reference_dtype: str | None = None
    reference_perplexity: float | None = None
    #: Share of scored positions where the model and the reference rank the same token first.
    top1_agreement: float | None = None
    #: Mean number of leading greedy tokens the model and the reference agree on, over :data:`PROMPTS`.
    greedy_leading_agreement: float | None = None
    #: Tokens each prompt was continued by.
    greedy_tokens: int = GREEDY_TOKENS

    def as_dict(self) -> dict[str, Any]:
        """The report as a JSON-ready dict."""
        return asdict(self)


def eval_chunks(model: Model, chunks: int = DEFAULT_CHUNKS, *, chunk_tokens: int = CHUNK_TOKENS) -> list[list[int]]:
    """The first ``chunks`` chunks of ``chunk_tokens`` token ids of the pydoc topic texts.

    Only :data:`CHUNK_TOKENS` gives figures comparable with other reports; a shorter chunk is
    for models whose context is shorter.
    """
    from pydoc_data.topics import topics

    for name, value in (("chunks", chunks), ("chunk_tokens", chunk_tokens)):
        if not isinstance(value, int) or isinstance(value, bool) or value < (1 if name == "chunks" else 2):
            raise InvalidParameterError(
                name, value, "a positive integer" + (" of at least 2" if name != "chunks" else "")
            )
    if chunk_tokens > model.context_length:
        raise InvalidParameterError(
            "chunk_tokens", chunk_tokens, f"at most the model's context length, {model.context_length}"
        )
    text = "\n\n".join(topics[name] for name in sorted(topics))
    # Encode only as much text as the chunks need (a token is rarely over 8 characters).
    ids = model.encode(text[: chunks * chunk_tokens * 8], add_special_tokens=False)
    available = len(ids) // chunk_tokens
    if available < chunks:
        raise InvalidParameterError("chunks", chunks, f"at most {available} (the evaluation text's length)")
    return [ids[i * chunk_tokens : (i + 1) * chunk_tokens] for i in range(chunks)]


def _log_softmax_at(logits: npt.NDArray[np.float32], targets: Sequence[int]) -> npt.NDArray[np.float64]:
    rows = logits.astype(np.float64)
    top = rows.max(axis=-1, keepdims=True)
    log_z = np.log(np.exp(rows - top).sum(axis=-1)) + top[:, 0]
    picked: npt.NDArray[np.float64] = rows[np.arange(len(targets)), targets] - log_z
    return picked


def scoring(model: Model) -> str:
    """How :func:`perplexity` scores ``model``: ``"all_logits"`` where its backend returns every
    position's logits from a prefill (the ``all_logits`` capability), else ``"decode"``."""
    from infer.contract import Capability, usable_capabilities

    return "all_logits" if Capability.ALL_LOGITS in usable_capabilities(model.info, model.handle) else "decode"


#: Rows of logits turned into log-probabilities at a time (a 262k vocabulary makes a 512-row chunk 0.5 GB).
_ROWS_AT_ONCE: Final = 64


def perplexity(
    model: Model, chunks: Sequence[Sequence[int]], *, by: str | None = None
) -> tuple[float, int, npt.NDArray[np.int64]]:
    """Perplexity of ``model`` on ``chunks``, the tokens scored, and its top-ranked token at each scored position.

    ``by``: ``"all_logits"`` scores each chunk in one all-position prefill, ``"decode"`` runs all
    chunks as one batch, a prefill of their first tokens then a decode step per position;
    ``None`` takes :func:`scoring`'s choice.
    """
    width = len(chunks[0])
    if any(len(c) != width for c in chunks) or width < 2:
        raise InvalidParameterError("chunks", [len(c) for c in chunks], "chunks of one length, at least 2 tokens")
    by = by or scoring(model)
    if by not in ("all_logits", "decode"):
        raise InvalidParameterError("by", by, "'all_logits', 'decode' or None")
    if by == "all_logits":
        return _perplexity_all_logits(model, chunks)
    caches = [model.new_sequence(width) for _ in chunks]
    try:
        logits = model.run_prefill(caches, [[c[0]] for c in chunks])
        nll = 0.0
        best = np.empty((len(chunks), width - 1), np.int64)
        for pos in range(1, width):
            targets = [c[pos] for c in chunks]
            nll -= float(_log_softmax_at(logits, targets).sum())
            best[:, pos - 1] = logits.argmax(axis=-1)
            if pos + 1 < width:
                logits = model.run_decode(caches, targets)
    finally:
        for cache in caches:
            cache.release()
    scored = len(chunks) * (width - 1)
    return math.exp(nll / scored), scored, best


def _perplexity_all_logits(model: Model, chunks: Sequence[Sequence[int]]) -> tuple[float, int, npt.NDArray[np.int64]]:
    width = len(chunks[0])
    nll = 0.0
    best = np.empty((len(chunks), width - 1), np.int64)
    for i, chunk in enumerate(chunks):
        cache = model.new_sequence(width)
        try:
            (logits,) = model.run_prefill_all([cache], [chunk])
        finally:
            cache.release()
        for start in range(0, width - 1, _ROWS_AT_ONCE):
            stop = min(start + _ROWS_AT_ONCE, width - 1)
            nll -= float(_log_softmax_at(logits[start:stop], chunk[start + 1 : stop + 1]).sum())
            best[i, start:stop] = logits[start:stop].argmax(axis=-1)
    scored = len(chunks) * (width - 1)
    return math.exp(nll / scored), scored, best


def prompt_logprobs(model: Model, ids: Sequence[int], top_logprobs: int = 0) -> list[TokenEvent]:
    """The log-probability of each token of ``ids`` given the ones before it (evaluation harnesses' echo).

    One event per token, in order: the first has ``logprob`` None (nothing predicts it), the
    others the log-probability under the model's raw distribution and the ``top_logprobs`` most
    likely alternatives, computed as generated tokens' are (:func:`infer.sampling.logprobs`).
    The contract returns the last position's logits only, so the prompt is fed one token per
    step: a prefill of its first token, then a decode step per token, each step's logits scoring
    the next token. ``text`` is each token's own text.
    """
    from infer.results import TokenEvent
    from infer.sampling import logprobs

    if not ids:
        raise InvalidParameterError("ids", ids, "at least one token")
    events = [TokenEvent(0, int(ids[0]), model.decode([ids[0]]))]
    cache = model.new_sequence(len(ids))
    try:
        row = model.run_prefill([cache], [[ids[0]]])[0]
        for position in range(1, len(ids)):
            token = int(ids[position])
            logprob, top = logprobs(row, token, top_logprobs)
            events.append(TokenEvent(position, token, model.decode([token]), logprob, top))
            if position + 1 < len(ids):
                row = model.run_decode([cache], [token])[0]
    finally:
        cache.release()
    return events


def greedy_agreement(model: Model, reference: Model, tokens: int = GREEDY_TOKENS) -> float:
    """Mean number of leading tokens on which ``model`` and ``reference`` continue :data:`PROMPTS` alike, greedily."""
    agreed = []
    for prompt in PROMPTS:
        runs = []
        for m in (model, reference):
            kwargs: dict[str, Any] = {"max_tokens": tokens, "temperature": 0.0}
            if m.chat_template is not None:
                completion = m.generate(messages=[{"role": "user", "content": prompt}], **kwargs)
            else:
                completion = m.generate(prompt, **kwargs)
            runs.append(list(completion.token_ids))
        ours, theirs = runs
        same = 0
        for a, b in zip(ours, theirs, strict=False):
            if a != b:
                break
            same += 1
        agreed.append(same)
    return float(np.mean(agreed))


def evaluate(
    model: Model, *, reference: Model | None = None, chunks: int = DEFAULT_CHUNKS, chunk_tokens: int = CHUNK_TOKENS
) -> EvalReport:
    """Perplexity of ``model`` on the fixed text and, given a ``reference``, the agreements with it."""
    ids = eval_chunks(model, chunks, chunk_tokens=chunk_tokens)
    # A model and its reference are scored the same way, so their perplexities share rounding paths.
    by = scoring(model) if reference is None or scoring(reference) == scoring(model) else "decode"
    started = time.perf_counter()
    ppl, scored, best = perplexity(model, ids, by=by)
    seconds = time.perf_counter() - started
    report = EvalReport(
        dtype=model.dtype,
        backend=model.backend,
        device=model.device,
        chunks=chunks,
        chunk_tokens=chunk_tokens,
        scored_tokens=scored,
        perplexity=ppl,
        seconds=round(seconds, 3),
        scoring=by,
    )
    if reference is None:
        return report
    ref_ppl, _, ref_best = perplexity(reference, ids, by=by)
    return EvalReport(
        **{
            **report.as_dict(),
            "reference_dtype": reference.dtype,
            "reference_perplexity": ref_ppl,
            "top1_agreement": float((best == ref_best).mean()),
            "greedy_leading_agreement": greedy_agreement(model, reference),
        }
    )
