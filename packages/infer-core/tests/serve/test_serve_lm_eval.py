"""lm-evaluation-harness scores a tiny local multiple-choice task through ``infer serve``.

Its ``local-completions`` model asks ``/v1/completions`` for the prompt's logprobs (``echo``,
``logprobs``, one generated token it drops) and tokenizes through the server's ``/tokenize``,
``/detokenize`` and ``/tokenizer_info`` (its remote tokenizer: no tokenizer files, no
transformers). Each choice's loglikelihood must equal the one the Python API gives for the same
tokens, and so must its greedy flag and the task's accuracy. The task and its data live in
``lm_eval_task/``; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("lm_eval", reason="needs lm-evaluation-harness: pip install 'lm-eval[api]' (tox env lm-eval)")
pytest.importorskip("tenacity", reason="lm-eval's API models need its [api] extra")
import lm_eval
from lm_eval.tasks import TaskManager
from serve_support import ServerProcess

import infer
from infer.evaluate import prompt_logprobs

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TASK_DIR = Path(__file__).parent / "lm_eval_task"
TASK = "infer_tiny_mc"


@pytest.fixture
def scored(tmp_path, monkeypatch):
    """lm-eval's per-sample results and the task's accuracy, scored through a running server."""
    # The JSON data files resolve against the working directory; the datasets cache stays in tmp.
    monkeypatch.chdir(TASK_DIR)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    with ServerProcess() as server:
        args = (
            f"model=fake,base_url={server.url}/v1/completions,tokenizer_backend=remote,"
            "num_concurrent=1,max_retries=1,batch_size=4"
        )
        out = lm_eval.simple_evaluate(
            model="local-completions",
            model_args=args,
            tasks=[TASK],
            task_manager=TaskManager(include_path=str(TASK_DIR)),
            log_samples=True,
        )
    return out["samples"][TASK], out["results"][TASK]["acc,none"]


def _python_api_loglikelihood(model: infer.Model, context: str, continuation: str) -> tuple[float, bool]:
    """What lm-eval computes, from the Python API: the continuation's summed logprob and whether
    each of its tokens is the likeliest (lm-eval tokenizes context and whole text, the rest is the
    continuation)."""
    context_ids = model.encode(context, add_special_tokens=False)
    whole = model.encode(context + continuation, add_special_tokens=False)
    events = prompt_logprobs(model, whole, top_logprobs=1)[len(context_ids) :]
    total = sum(float(e.logprob) for e in events if e.logprob is not None)
    greedy = all(e.top_logprobs[0][0] == e.token_id for e in events)
    return total, greedy


def test_lm_eval_loglikelihoods_through_the_server_equal_the_python_apis(scored):
    samples, accuracy = scored
    assert len(samples) == 6
    model = infer.load("fake", backend="fake")
    try:
        correct = 0
        for sample in samples:
            got = [resp for resp, _ in sample["filtered_resps"]], [flag for _, flag in sample["filtered_resps"]]
            expected = [_python_api_loglikelihood(model, ctx, cont) for ctx, cont in sample["arguments"]]
            assert got[0] == pytest.approx([ll for ll, _ in expected], rel=1e-5, abs=1e-4), sample["arguments"]
            assert got[1] == [greedy for _, greedy in expected]
            best = max(range(len(expected)), key=lambda i: expected[i][0])
            correct += best == sample["target"]
            assert sample["acc"] == float(best == sample["target"])
    finally:
        model.close()
    assert accuracy == pytest.approx(correct / len(samples))
