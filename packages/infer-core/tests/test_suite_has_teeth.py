"""The conformance suite must fail on every deliberately broken backend, in the test made for its defect.

Each row names a broken backend (``broken_backends.py``: one defect each, on the fake or on the
numpy example backend), the suite module and the test that must fail on it. Only that module
runs, narrowed to that test, so 37 defects cost about a minute; the conformance tox environments
prove the same tests pass on the fake, numpy and ONNX backends.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from infer_conformance.runner import run_suite

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HERE = Path(__file__).parent

#: (variant in broken_backends, suite module, the test that must fail, with its parameter if any)
DEFECTS = [
    # wrong model maths, caught by the goldens and the reference
    ("ROPE_INTERLEAVED", "test_goldens", "test_last_position_logits_after_prefill_match_the_goldens[llama]"),
    ("GQA_TILED", "test_goldens", "test_teacher_forced_decode_logits_match_the_goldens[llama]"),
    ("TOLERANCE_ABUSE", "test_goldens", "test_last_position_logits_after_prefill_match_the_goldens[llama]"),
    (
        "POSITIONS_SATURATE",
        "test_long_context",
        "test_a_context_filled_by_chunked_prefill_then_decode_reaches_its_last_position",
    ),
    # KV cache limits and invariants
    ("KV_WRAPS_AT_128", "test_long_context", "test_the_first_token_still_changes_the_logits_at_the_end_of_the_context"),
    ("KV_NOT_APPENDED", "test_kv", "test_prefill_then_decode_equals_prefill_of_the_whole_prompt"),
    ("PERTURBED_LOGITS", "test_kv", "test_several_decode_steps_equal_one_prefill"),
    ("RELEASE_KEEPS_NBYTES", "test_kv", "test_release_frees_the_cache_memory_and_is_idempotent"),
    ("CAPACITY_SHORT", "test_kv", "test_new_cache_is_empty_with_the_requested_capacity"),
    ("WRONG_VOCAB", "test_contract", "test_prefill_returns_float32_logits_of_shape_rows_by_vocab"),
    # declared capabilities
    ("ULP_JITTER", "test_capabilities", "test_deterministic_backends_repeat_prefill_and_decode_bit_for_bit"),
    ("BATCH_CROSSTALK", "test_capabilities", "test_a_ragged_batch_gives_the_same_logits_as_each_row_alone"),
    (
        "SAMPLER_IGNORES_TOP_P",
        "test_capabilities",
        "test_the_device_sampler_draws_from_the_reference_distribution[top_p]",
    ),
    (
        "SAMPLER_IGNORES_PENALTIES",
        "test_capabilities",
        "test_the_device_sampler_equals_the_reference_sampler_where_it_is_deterministic[penalties]",
    ),
    (
        "SAMPLER_IGNORES_LOGIT_BIAS",
        "test_capabilities",
        "test_the_device_sampler_equals_the_reference_sampler_where_it_is_deterministic[logit_bias]",
    ),
    # contract 1.2: a device sampler that declares token masks
    (
        "SAMPLER_IGNORES_TOKEN_MASK",
        "test_capabilities",
        "test_the_device_sampler_never_draws_a_masked_token[temperature]",
    ),
    ("SYNTHETIC_AS_DEFAULT", "test_capabilities", "test_a_synthetic_backend_is_never_chosen_by_default"),
    ("SEED_IGNORED", "test_generation", "test_the_same_seed_gives_the_same_tokens"),
    # the load contract
    ("CLAIMS_EVERYTHING", "test_load", "test_a_name_no_backend_knows_is_declined"),
    ("IGNORES_DTYPE", "test_load", "test_an_unknown_dtype_or_device_is_refused_by_name[dtype]"),
    ("IGNORES_DEVICE", "test_load", "test_an_unknown_dtype_or_device_is_refused_by_name[device]"),
    ("UNLOADABLE_DTYPE", "test_load", "test_every_declared_dtype_loads_and_reports_itself"),
    ("UNLOADABLE_DEVICE", "test_load", "test_every_declared_device_loads_and_reports_itself_or_says_it_is_absent"),
    ("WRONG_EOS", "test_load", "test_vocab_eos_ids_and_context_length_equal_the_bundles"),
    ("SHORT_CONTEXT", "test_load", "test_vocab_eos_ids_and_context_length_equal_the_bundles"),
    # contract 1.1 KV capabilities
    ("TRUNCATE_KEEPS_HASH", "test_kv_reuse", "test_truncate_then_decode_equals_never_having_appended"),
    (
        "TRUNCATE_UNDOES_LAST_STEP",
        "test_kv_reuse",
        "test_truncate_inside_the_prompt_then_prefill_equals_a_prefill_of_the_kept_tokens",
    ),
    ("FORK_KEEPS_WHOLE_HASH", "test_kv_reuse", "test_a_fork_equals_a_prefill_of_the_same_prefix"),
    ("FORK_SHARES_LIFETIME", "test_kv_reuse", "test_a_fork_and_its_source_are_independent"),
    ("ALL_LOGITS_SHIFTED", "test_kv_reuse", "test_all_position_logits_equal_successive_decodes"),
    ("ALL_LOGITS_ROWS_REVERSED", "test_kv_reuse", "test_all_position_logits_of_a_ragged_batch_come_row_after_row"),
    (
        "FORK_ONE_SHORT",
        "test_kv_reuse",
        "test_requests_served_from_the_prefix_cache_give_the_plain_greedy_tokens",
    ),
    # resources, concurrency, cancellation
    ("RELEASE_LEAKS", "test_resources", "test_caches_at_full_context_released_repeatedly_give_their_memory_back"),
    ("ALIASED_LOGITS", "test_resources", "test_returned_logits_are_never_overwritten_by_later_steps"),
    (
        "SHARED_SCRATCH",
        "test_resources",
        "test_two_models_of_the_backend_stepped_from_two_threads_equal_their_solo_runs",
    ),
    ("CANCELLATION_IGNORED", "test_lifecycle", "test_ending_a_stream_stops_backend_work_within_one_step[close]"),
    # hangs: a step that never returns is reported, the suite does not hang with it
    ("HANGS", "test_lifecycle", "test_a_deadline_ends_a_slow_stream_without_waiting_for_its_end"),
]


def test_every_defect_has_its_own_broken_backend():
    import broken_backends

    variants = [variant for variant, _, _ in DEFECTS]
    assert len(set(variants)) == len(variants) >= 25
    names = {getattr(broken_backends, v).name for v in variants}
    assert len(names) == len(variants)


@pytest.mark.parametrize(("variant", "module", "must_fail"), DEFECTS, ids=[d[0] for d in DEFECTS])
def test_the_suite_fails_on_a_broken_backend_in_the_test_for_its_defect(variant, module, must_fail):
    import broken_backends

    backend = getattr(broken_backends, variant).name
    function = must_fail.partition("[")[0]
    result = run_suite(
        "--tb=line",  # one line per failure: the report stays readable however broken the backend
        "-p",
        "no:hypothesispytest",
        "-o",
        "addopts=",
        "--pyargs",
        f"infer_conformance.suite.{module}",
        f"--infer-plugin=broken_backends:{variant}",
        f"--infer-backend={backend}",
        "-k",
        function,
        path=HERE,
    )
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAILED")]
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert any(f"::{must_fail}" in line for line in failed), "\n".join(failed) or result.stdout[-3000:]
