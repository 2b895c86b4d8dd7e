"""What every engine does, run once per engine (llama.cpp on the GGUF, transformers on the same
model as safetensors): continuous batching, limits, stop strings, cancellation, sampling seeds,
shared prefixes and LoRA swaps between batches. Engine-specific tests are in test_engine_<name>.py."""

from __future__ import annotations

import pytest

from tests import engine_cases as cases


@pytest.fixture(scope="module", params=["llama.cpp", "transformers"])
def engine_root(request):
    """(engine, its installed root) for each backend."""
    if request.param == "llama.cpp":
        return request.getfixturevalue("llama_engine"), request.getfixturevalue("gguf_root")
    return request.getfixturevalue("tf_engine"), request.getfixturevalue("st_root")


@pytest.mark.parametrize("case", [cases.check_batched_equals_alone, cases.check_join_mid_answer,
                                  cases.check_limits_and_stops, cases.check_cancel_frees_slot,
                                  cases.check_queue_bound, cases.check_sampling_seed,
                                  cases.check_empty_and_overlong_prompts, cases.check_shared_prefix],
                         ids=lambda c: c.__name__.removeprefix("check_"))
def test_engine_behaviour(engine_root, case):
    case(engine_root[0])


def test_lora_swap_between_batches(engine_root, random_lora):
    engine, root = engine_root
    cases.check_adapter_swap(engine, root.layout, random_lora)


def test_broken_adapter_keeps_the_current_one(engine_root):
    engine, root = engine_root
    cases.check_bad_adapter_keeps_serving(engine, root.layout)
