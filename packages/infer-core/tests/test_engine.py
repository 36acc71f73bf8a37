"""The engine on the fake backend: chunked prefill, text streaming, faults, lifetime."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

import infer
from infer_conformance.probes import StepRecorder, installed

pytestmark = pytest.mark.integration

PROMPT = [5, 17, 42, 8, 99, 3, 61, 27, 14, 33]


def test_a_long_prompt_is_prefilled_in_chunks_of_the_configured_size():
    model = infer.load("fake", backend="fake", prefill_chunk_size=4)
    reference = infer.load("fake", backend="fake")
    try:
        with installed(StepRecorder(model.handle)) as recorder:
            chunked = model.generate(PROMPT, max_tokens=5, temperature=0, ignore_eos=True)
        assert recorder.count("prefill") == 3  # 4 + 4 + 2 tokens
        assert chunked.token_ids == reference.generate(PROMPT, max_tokens=5, temperature=0, ignore_eos=True).token_ids
    finally:
        model.close()
        reference.close()


def test_streamed_text_never_holds_half_a_utf8_character(fake):
    text = "héllo wörld, 机器人 🤖 paints"
    ids = fake.encode(text)
    assert len(ids) == len(text.encode())  # one byte per token: characters span several tokens
    decoder = fake.tokenizer.stream_decoder()
    pieces = [decoder.step(i) for i in ids]
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)
    assert "" in pieces  # some tokens completed no character yet


def test_streamed_deltas_add_up_to_the_decoded_tokens(fake):
    stream = fake.stream("hello", max_tokens=40, temperature=0.8, seed=3, ignore_eos=True)
    deltas = "".join(event.text for event in stream)
    assert deltas == stream.completion.text == fake.decode(stream.completion.token_ids)


def test_chat_messages_are_rendered_with_the_model_template(fake):
    text = fake.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    completion = fake.generate(messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=0)
    assert completion.usage.prompt_tokens == len(fake.encode(text, add_special_tokens=False))


def test_prompt_and_messages_together_are_refused(fake):
    with pytest.raises(infer.InvalidParameterError, match="exactly one"):
        fake.generate("x", messages=[{"role": "user", "content": "y"}])


def test_max_tokens_none_generates_up_to_the_context_length():
    model = infer.load("fake", backend="fake", context_length=32)
    try:
        completion = model.generate(PROMPT, max_tokens=None, temperature=0, ignore_eos=True)
        assert completion.usage.completion_tokens == 32 - len(PROMPT)
        assert completion.finish_reason == "length"
    finally:
        model.close()


def test_a_backend_exception_becomes_a_typed_error_and_the_model_stays_usable():
    model = infer.load("fake", backend="fake", raise_at_step=3)
    try:
        with pytest.raises(infer.BackendError, match="fault injected at step 3") as raised:
            model.generate(PROMPT, max_tokens=10, temperature=0)
        assert raised.value.backend == "fake"
        assert model.generate(PROMPT, max_tokens=4, temperature=0, ignore_eos=True).usage.completion_tokens == 4
        assert model.active_requests == 0
    finally:
        model.close()


def test_the_fake_hang_fault_surfaces_as_a_deadline_and_the_next_request_succeeds():
    model = infer.load("fake", backend="fake", hang_at_step=2, hang_seconds=1.0)
    try:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            model.generate(PROMPT, max_tokens=10, temperature=0, timeout=0.2)
        assert time.monotonic() - started < 0.8
        assert model.generate(PROMPT, max_tokens=3, temperature=0, ignore_eos=True).usage.completion_tokens == 3
    finally:
        model.close()


def test_per_step_latency_slows_every_step():
    model = infer.load("fake", backend="fake", latency=0.02)
    try:
        started = time.monotonic()
        model.generate(PROMPT, max_tokens=5, temperature=0, ignore_eos=True)
        assert time.monotonic() - started >= 5 * 0.02
    finally:
        model.close()


def test_a_corrupted_cache_changes_the_logits(fake):
    model = infer.load("fake", backend="fake", corrupt_cache_at_step=2)
    try:
        seq, ref = model.new_sequence(16), fake.new_sequence(16)
        model.run_prefill([seq], [PROMPT[:5]])
        fake.run_prefill([ref], [PROMPT[:5]])
        assert (model.run_decode([seq], [7]) != fake.run_decode([ref], [7])).any()
    finally:
        model.close()


def test_closing_the_model_fails_running_requests_and_refuses_new_ones():
    model = infer.load("fake", backend="fake", latency=0.01)
    stream = model.stream(PROMPT, max_tokens=1000, temperature=0, ignore_eos=True)
    next(stream)
    model.close()
    with pytest.raises(infer.ModelClosedError):
        for _ in stream:
            pass
    with pytest.raises(infer.ModelClosedError):
        model.generate(PROMPT)
    model.close()  # idempotent


def test_a_cancelled_stream_result_raises_request_cancelled(fake):
    stream = fake.stream(PROMPT, max_tokens=100, temperature=0, ignore_eos=True)
    stream.close()
    with pytest.raises(infer.RequestCancelledError):
        stream.result()


def test_agenerate_returns_the_same_completion_as_generate(fake):
    sync = fake.generate(PROMPT, max_tokens=8, temperature=0.7, seed=5, ignore_eos=True)
    async_ = asyncio.run(fake.agenerate(PROMPT, max_tokens=8, temperature=0.7, seed=5, ignore_eos=True))
    assert async_.token_ids == sync.token_ids
    assert async_.text == sync.text


def test_completion_reports_usage_and_timings(fake):
    completion = fake.generate(PROMPT, max_tokens=12, temperature=0, ignore_eos=True)
    assert completion.usage.total_tokens == len(PROMPT) + 12
    assert completion.timings.time_to_first_token > 0
    assert completion.timings.decode_tokens_per_s > 0
    assert completion.timings.total >= completion.timings.time_to_first_token
    assert completion.id.startswith("req-")


def test_sampling_params_and_keyword_overrides_combine(fake):
    params = infer.SamplingParams(max_tokens=3, temperature=0)
    assert fake.generate(PROMPT, params=params, ignore_eos=True).usage.completion_tokens == 3
    assert fake.generate(PROMPT, params=params, max_tokens=5, ignore_eos=True).usage.completion_tokens == 5


def test_the_fake_refuses_unknown_options_and_devices():
    with pytest.raises(infer.InvalidParameterError, match="no_such"):
        infer.load("fake", backend="fake", no_such=1)
    with pytest.raises(infer.InvalidParameterError, match="device"):
        infer.load("fake", backend="fake", device="cuda")
    with pytest.raises(infer.InvalidParameterError, match="vocab_size"):
        infer.load("fake", backend="fake", vocab_size=10)


def test_load_refuses_a_bad_prefill_chunk_size():
    with pytest.raises(infer.InvalidParameterError, match="prefill_chunk_size"):
        infer.load("fake", backend="fake", prefill_chunk_size=0)


def test_requests_from_many_threads_are_batched_into_shared_decode_steps():
    model = infer.load("fake", backend="fake", latency=0.005)
    try:
        with installed(StepRecorder(model.handle)) as recorder:
            threads = [
                threading.Thread(
                    target=model.generate, args=([i + 1, 2, 3],), kwargs={"max_tokens": 20, "ignore_eos": True}
                )
                for i in range(8)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
        assert max(size for kind, size, *_ in recorder.calls if kind == "decode") > 1
    finally:
        model.close()


def test_a_request_arriving_while_another_decodes_alone_joins_its_steps_at_once():
    model = infer.load("fake", backend="fake", latency=0.002)
    try:
        with installed(StepRecorder(model.handle)) as recorder:
            long = iter(model.stream([1, 2, 3], max_tokens=300, ignore_eos=True))
            next(long)  # the long request is now decoding alone
            short = model.generate([4, 5, 6], max_tokens=5, ignore_eos=True)
            remaining = sum(1 for _ in long)
        assert short.usage.completion_tokens == 5
        assert remaining > 200  # the short one ran beside it, not after it
        assert any(kind == "decode" and size == 2 for kind, size, *_ in recorder.calls)
    finally:
        model.close()


def test_nan_logits_from_a_backend_end_the_request_with_an_error_naming_the_backend(fake):
    import numpy as np

    class NaNLogits:
        @infer.hookimpl(wrapper=True)
        def infer_decode(self, model, batch):
            logits = yield
            return np.full_like(logits, np.nan)

    with installed(NaNLogits()), pytest.raises(infer.BackendError) as raised:
        fake.generate(PROMPT, max_tokens=5, temperature=0, ignore_eos=True)
    assert raised.value.backend == "fake"
    assert fake.generate(PROMPT, max_tokens=2, temperature=0, ignore_eos=True).usage.completion_tokens == 2


def test_a_reference_that_names_nothing_is_a_typed_not_found_error():
    with pytest.raises(infer.ModelNotFoundError, match="smollm2-135m-instruct") as raised:
        infer.load("no-such-model-anywhere")
    assert isinstance(raised.value, FileNotFoundError)


def test_a_folder_no_backend_accepts_is_an_unsupported_model_error(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"")
    with pytest.raises(infer.UnsupportedModelError, match="no installed backend"):
        infer.load(tmp_path, backend="fake")
