"""Steps on the built graph: KV written in place, batches equal single rows, caches grow and fail cleanly."""

from __future__ import annotations

import gc

import numpy as np
import numpy.typing as npt
import pytest
from onnx_helpers import PROMPT, Loader, step

from infer.contract import KVCache
from infer.errors import BackendError, ContextLengthError, EmptyPromptError, InvalidTokenError
from infer_backend_onnx.kv_pool import OnnxKVCache, host_zeros
from infer_backend_onnx.runtime import OnnxModel

pytestmark = pytest.mark.integration

ATOL = 1e-5


def test_decode_after_prefill_equals_a_full_prefill(tiny_fp32: OnnxModel) -> None:
    full = tiny_fp32.new_sequence(len(PROMPT))
    expected = step(tiny_fp32, [full], [PROMPT])[0]
    cache = tiny_fp32.new_sequence(len(PROMPT))
    step(tiny_fp32, [cache], [PROMPT[:5]])
    for token in PROMPT[5:]:
        got = step(tiny_fp32, [cache], [[token]], decode=True)[0]
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)


def test_decode_appends_one_token_to_the_cache(tiny_fp32: OnnxModel) -> None:
    cache = tiny_fp32.new_sequence(16)
    step(tiny_fp32, [cache], [PROMPT[:4]])
    assert cache.length == 4
    step(tiny_fp32, [cache], [[5]], decode=True)
    assert cache.length == 5


def test_decode_writes_the_kv_buffer_in_place(tiny_fp32: OnnxModel) -> None:
    cache = tiny_fp32.new_sequence(16)
    step(tiny_fp32, [cache], [PROMPT[:4]])
    block = cache.block
    assert block is not None and block.host is not None
    before = block.host[0].copy()
    step(tiny_fp32, [cache], [[5]], decode=True)
    assert cache.block is block  # no reallocation, no copy
    after = block.host[0]
    np.testing.assert_array_equal(after[:, :, :4], before[:, :, :4])
    assert np.abs(after[0, :, 4]).sum() > 0  # the new position was written into the bound buffer


def test_chunked_prefill_equals_one_prefill(tiny_fp32: OnnxModel) -> None:
    whole = step(tiny_fp32, [tiny_fp32.new_sequence(32)], [PROMPT])[0]
    cache = tiny_fp32.new_sequence(32)
    for chunk in (PROMPT[:4], PROMPT[4:9], PROMPT[9:]):
        got = step(tiny_fp32, [cache], [chunk])[0]
    np.testing.assert_allclose(got, whole, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "rows",
    [[PROMPT, PROMPT[:3], PROMPT[2:9]], [PROMPT, PROMPT[:11], PROMPT[1:11]]],
    ids=["grouped-by-length", "padded-into-one-run"],
)
def test_ragged_first_prompts_in_one_batch_equal_single_rows(tiny_fp32: OnnxModel, rows: list[list[int]]) -> None:
    singles = np.stack([step(tiny_fp32, [tiny_fp32.new_sequence(32)], [r])[0] for r in rows])
    caches = [tiny_fp32.new_sequence(32) for _ in rows]
    batched = step(tiny_fp32, caches, rows)
    np.testing.assert_allclose(batched, singles, atol=ATOL, rtol=0)
    # Then decode the three together, each at its own position, and compare with single rows.
    nxt = [[7], [8], [9]][: len(rows)]
    batched = step(tiny_fp32, caches, nxt, decode=True)
    singles = []
    for r, t in zip(rows, nxt, strict=True):
        c = tiny_fp32.new_sequence(32)
        step(tiny_fp32, [c], [r])
        singles.append(step(tiny_fp32, [c], [t], decode=True)[0])
    np.testing.assert_allclose(batched, np.stack(singles), atol=ATOL, rtol=0)


def test_first_prompts_of_close_lengths_share_one_padded_run(tiny_fp32: OnnxModel) -> None:
    caches = [tiny_fp32.new_sequence(32) for _ in range(3)]
    step(tiny_fp32, caches, [PROMPT, PROMPT[:11], PROMPT[1:11]])
    # One run put all three rows into one block; a run per length would have left them apart.
    assert caches[0].block is caches[1].block is caches[2].block


def test_first_prompts_of_distant_lengths_run_per_length(tiny_fp32: OnnxModel) -> None:
    caches = [tiny_fp32.new_sequence(32) for _ in range(2)]
    step(tiny_fp32, caches, [PROMPT, PROMPT[:2]])
    assert caches[0].block is not caches[1].block


def test_ragged_chunks_on_caches_with_history_equal_single_rows(tiny_fp32: OnnxModel) -> None:
    a, b = tiny_fp32.new_sequence(32), tiny_fp32.new_sequence(32)
    step(tiny_fp32, [a], [PROMPT[:2]])
    batched = step(tiny_fp32, [a, b], [PROMPT[2:7], PROMPT[:4]])
    a1, b1 = tiny_fp32.new_sequence(32), tiny_fp32.new_sequence(32)
    step(tiny_fp32, [a1], [PROMPT[:2]])
    expected = np.stack([step(tiny_fp32, [a1], [PROMPT[2:7]])[0], step(tiny_fp32, [b1], [PROMPT[:4]])[0]])
    np.testing.assert_allclose(batched, expected, atol=ATOL, rtol=0)
    assert (a.length, b.length) == (7, 4)


def test_batch_order_changes_keep_each_rows_history(tiny_fp32: OnnxModel) -> None:
    a, b = tiny_fp32.new_sequence(32), tiny_fp32.new_sequence(32)
    step(tiny_fp32, [a, b], [PROMPT[:5], PROMPT[3:6]])
    swapped = step(tiny_fp32, [b, a], [[11], [12]], decode=True)
    a1, b1 = tiny_fp32.new_sequence(32), tiny_fp32.new_sequence(32)
    step(tiny_fp32, [a1], [PROMPT[:5]])
    step(tiny_fp32, [b1], [PROMPT[3:6]])
    expected = np.stack([step(tiny_fp32, [b1], [[11]], decode=True)[0], step(tiny_fp32, [a1], [[12]], decode=True)[0]])
    np.testing.assert_allclose(swapped, expected, atol=ATOL, rtol=0)


def test_a_cache_grows_past_its_requested_capacity_without_changing_results(tiny_fp32: OnnxModel) -> None:
    expected = step(tiny_fp32, [tiny_fp32.new_sequence(32)], [PROMPT])[0]
    cache = tiny_fp32.new_sequence(3)
    step(tiny_fp32, [cache], [PROMPT[:3]])
    assert cache.capacity == 3
    for token in PROMPT[3:]:
        got = step(tiny_fp32, [cache], [[token]], decode=True)[0]
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)
    # Geometric growth: 3 -> 6 -> 12, not one reallocation per token.
    assert cache.capacity == 12


def test_kv_memory_is_sized_to_the_request_not_the_context(tiny_fp32: OnnxModel) -> None:
    cache = tiny_fp32.new_sequence(8)
    step(tiny_fp32, [cache], [PROMPT[:2]])
    per_token = 2 * tiny_fp32.layers * tiny_fp32.kv_heads * tiny_fp32.head_dim * 4
    assert cache.nbytes == 8 * per_token
    assert tiny_fp32.context_length > 8


def test_release_frees_the_cache_and_is_idempotent(tiny_fp32: OnnxModel) -> None:
    cache = tiny_fp32.new_sequence(8)
    step(tiny_fp32, [cache], [PROMPT[:2]])
    cache.release()
    cache.release()
    assert cache.released and cache.nbytes == 0
    with pytest.raises(BackendError, match="released"):
        step(tiny_fp32, [cache], [[3]], decode=True)


def test_tokens_outside_the_vocabulary_raise_invalid_token(tiny_fp32: OnnxModel) -> None:
    cache = tiny_fp32.new_sequence(8)
    with pytest.raises(InvalidTokenError) as info:
        step(tiny_fp32, [cache], [[1, 2, tiny_fp32.vocab_size]])
    assert info.value.position == 2
    assert cache.length == 0


def test_feeding_past_the_context_raises_context_length(tiny_fp32: OnnxModel) -> None:
    cache = tiny_fp32.new_sequence(8)
    with pytest.raises(ContextLengthError):
        step(tiny_fp32, [cache], [[1] * (tiny_fp32.context_length + 1)])


def test_a_row_without_tokens_raises_empty_prompt(tiny_fp32: OnnxModel) -> None:
    with pytest.raises(EmptyPromptError):
        step(tiny_fp32, [tiny_fp32.new_sequence(8)], [[]])


def test_a_cache_from_another_model_is_refused(tiny_fp32: OnnxModel) -> None:
    class Foreign(KVCache):
        length = capacity = nbytes = 0
        released = False

        def release(self) -> None:
            pass

    with pytest.raises(BackendError, match="not made by this onnx model"):
        step(tiny_fp32, [Foreign()], [[1]])


def test_the_same_cache_twice_in_a_batch_is_refused(tiny_fp32: OnnxModel) -> None:
    cache = tiny_fp32.new_sequence(8)
    with pytest.raises(BackendError, match="twice"):
        step(tiny_fp32, [cache, cache], [[1], [2]])


def test_identical_inputs_give_bit_identical_logits(tiny_fp32: OnnxModel) -> None:
    runs = [step(tiny_fp32, [tiny_fp32.new_sequence(16)], [PROMPT]) for _ in range(2)]
    np.testing.assert_array_equal(runs[0], runs[1])


def _rss_mib() -> float:
    import psutil

    return float(psutil.Process().memory_info().rss) / 2**20


def test_host_zeros_is_a_writable_zero_array_of_the_given_shape() -> None:
    array = host_zeros((2, 3, 5), np.float16)
    assert array.shape == (2, 3, 5) and array.dtype == np.float16
    assert not array.any()
    array[1, 2, 4] = 7.0
    assert array.sum() == 7.0


def test_freed_kv_sized_arrays_give_their_memory_back_to_the_os() -> None:
    # Once a large chunk was freed, glibc serves chunks of that size from its heap, and a freed
    # chunk below a live allocation stays in the process: what KV blocks did as batches changed
    # shape between smaller allocations that live on. Mapped arrays leave nothing behind.
    np.ones(24 << 18, np.float32)  # 24 MiB allocated and freed: raises glibc's mmap threshold
    gc.collect()
    before = _rss_mib()
    blocks, live = [], []
    for _ in range(16):
        blocks.append(host_zeros((4 << 18,), np.float32))  # 16 x 4 MiB
        blocks[-1][:] = 1.0
        live.append(np.ones(1024, np.float32))  # outlives the blocks
    assert _rss_mib() - before > 48
    del blocks
    gc.collect()
    assert _rss_mib() - before < 8


def _alone(model: OnnxModel, history: list[int], token: int) -> npt.NDArray[np.float32]:
    """Next-token logits of ``history + [token]`` fed to a fresh cache on its own."""
    cache = model.new_sequence(len(history) + 1)
    step(model, [cache], [history])
    return step(model, [cache], [[token]], decode=True)[0]


def _decoding(model: OnnxModel, prompts: list[list[int]]) -> list[OnnxKVCache]:
    caches = [model.new_sequence(64) for _ in prompts]
    for cache, prompt in zip(caches, prompts, strict=True):
        step(model, [cache], [prompt])
    step(model, caches, [[5]] * len(caches), decode=True)  # one shared decode block from here
    return caches


def test_a_sequence_leaving_a_decode_batch_frees_its_row_and_the_others_stay_put(tiny_fp32: OnnxModel) -> None:
    prompts = [PROMPT[:4], PROMPT[:7], PROMPT[2:9], PROMPT[1:6]]
    caches = _decoding(tiny_fp32, prompts)
    block = caches[0].block
    caches[1].release()
    logits = step(tiny_fp32, [caches[0], caches[2], caches[3]], [[9]] * 3, decode=True)
    assert all(c.block is block for c in (caches[0], caches[2], caches[3]))
    for row, i in enumerate((0, 2, 3)):
        np.testing.assert_allclose(logits[row], _alone(tiny_fp32, [*prompts[i], 5], 9), atol=ATOL, rtol=0)


def test_a_newcomer_takes_a_free_row_of_the_running_block(tiny_fp32: OnnxModel) -> None:
    prompts = [PROMPT[:4], PROMPT[:7], PROMPT[2:9], PROMPT[1:6]]
    caches = _decoding(tiny_fp32, prompts)
    block = caches[0].block
    caches[1].release()
    newcomer = tiny_fp32.new_sequence(64)
    step(tiny_fp32, [newcomer], [PROMPT[3:11]])
    batch = [caches[3], newcomer, caches[0], caches[2]]  # any order
    logits = step(tiny_fp32, batch, [[7]] * 4, decode=True)
    assert newcomer.block is block and newcomer.row == 1
    expected = [[*prompts[3], 5], PROMPT[3:11], [*prompts[0], 5], [*prompts[2], 5]]
    for row, history in enumerate(expected):
        np.testing.assert_allclose(logits[row], _alone(tiny_fp32, history, 7), atol=ATOL, rtol=0)


def test_a_batch_missing_a_row_still_in_use_moves_to_its_own_block(tiny_fp32: OnnxModel) -> None:
    prompts = [PROMPT[:4], PROMPT[:7], PROMPT[2:9]]
    caches = _decoding(tiny_fp32, prompts)
    shared = caches[0].block
    step(tiny_fp32, [caches[0], caches[2]], [[9], [9]], decode=True)  # caches[1] sits this step out
    assert caches[0].block is not shared and caches[1].block is shared
    np.testing.assert_allclose(
        step(tiny_fp32, [caches[1]], [[9]], decode=True)[0], _alone(tiny_fp32, [*prompts[1], 5], 9), atol=ATOL, rtol=0
    )


def test_a_block_with_most_rows_free_is_compacted(tiny_fp32: OnnxModel) -> None:
    caches = _decoding(tiny_fp32, [PROMPT[:4], PROMPT[:5], PROMPT[:6], PROMPT[:7]])
    shared = caches[0].block
    for cache in caches[1:3]:
        cache.release()
    step(tiny_fp32, [caches[0], caches[3]], [[9], [9]], decode=True)
    block = caches[0].block
    assert block is not shared and block is not None and block.rows == 2


def test_with_pairing_a_lone_sequence_decodes_beside_a_free_row(load_tiny: Loader) -> None:
    model = load_tiny("int4")
    assert model.pad_single_rows
    cache = model.new_sequence(32)
    step(model, [cache], [PROMPT[:5]])
    step(model, [cache], [[9]], decode=True)
    block = cache.block
    assert block is not None and block.rows == 2 and block.holder(1) is None


def test_a_kept_cache_holds_its_own_tokens_and_leaves_its_batchs_block_free(build_dir) -> None:
    """With prefix caching, a request finishing in a decode batch is kept as a copy of exactly its
    tokens: the batch keeps its block (no move for a row still in use), and once every request is
    done no batch block stays pinned by a kept row that the budget counts as a fraction of it."""
    import threading
    import weakref

    import infer
    from infer_backend_onnx.kv_pool import KVBlock
    from infer_conformance.fixtures import TINY_LLAMA

    model = infer.load(str(TINY_LLAMA), backend="onnx", prefix_cache=True, cache_dir=build_dir, threads=1)
    blocks: list[weakref.ref[KVBlock]] = []
    made = KVBlock.__init__

    def tracked(self: KVBlock, *args: object, **kwargs: object) -> None:
        made(self, *args, **kwargs)  # type: ignore[arg-type]
        blocks.append(weakref.ref(self))

    try:
        KVBlock.__init__ = tracked  # type: ignore[method-assign]
        params = {"temperature": 0, "ignore_eos": True}
        lengths = [4, 9, 14, 20]  # finishing one after another while the others decode
        threads = [
            threading.Thread(target=model.generate, args=([*PROMPT[:12], i],), kwargs=params | {"max_tokens": n})
            for i, n in enumerate(lengths)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        kept = [entry.kv for entry in model._engine.prefix_cache._entries.values()]  # type: ignore[union-attr]
        assert len(kept) == len(lengths)
        for kv in kept:
            assert isinstance(kv, OnnxKVCache) and kv.block is not None
            assert (kv.block.rows, kv.block.capacity) == (1, kv.length)
        gc.collect()
        alive = {id(b()) for b in blocks if b() is not None}
        assert alive == {id(kv.block) for kv in kept}  # nothing else is held
        assert model.prefix_cache_stats is not None
        assert model._engine.prefix_cache.nbytes == sum(kv.block.nbytes for kv in kept)  # type: ignore[union-attr]
    finally:
        KVBlock.__init__ = made  # type: ignore[method-assign]
        model.close()
