"""The transformers (+peft) engine on SmolLM2 safetensors (fp32 on CPU): the same behaviour as llama.cpp,
and the server on top of it with the openai client."""

from __future__ import annotations

import openai
import pytest

from appliance.server.app import Settings, create_app
from tests import engine_cases as cases
from tests.server_fixtures import live_server, make_root


@pytest.fixture(scope="module")
def st_root(tmp_path_factory, smollm2_safetensors):
    return make_root(tmp_path_factory.mktemp("stroot"), smollm2_safetensors, backend="transformers", max_batch=4)


@pytest.fixture(scope="module")
def tf_engine(st_root):
    from appliance.engines import load_engine

    cfg = st_root.config
    assert cfg.model.backend == "transformers"
    engine = load_engine(cfg.model, st_root.layout, max_batch=cfg.server.max_batch, max_queue=cfg.server.max_queue)
    engine.start()
    yield engine
    engine.close()


def test_batched_answers_equal_answers_alone(tf_engine):
    cases.check_batched_equals_alone(tf_engine)


def test_shared_prefix_cache_does_not_change_answers(tf_engine):
    cases.check_shared_prefix(tf_engine)


def test_request_joins_mid_answer(tf_engine):
    cases.check_join_mid_answer(tf_engine)


def test_max_tokens_and_stop_strings(tf_engine):
    cases.check_limits_and_stops(tf_engine)


def test_cancel_frees_the_slot(tf_engine):
    cases.check_cancel_frees_slot(tf_engine)


def test_queue_is_bounded(tf_engine):
    cases.check_queue_bound(tf_engine)


def test_seeded_sampling_repeats(tf_engine):
    cases.check_sampling_seed(tf_engine)


def test_empty_and_overlong_prompts(tf_engine):
    cases.check_empty_and_overlong_prompts(tf_engine)


def test_lora_swap_between_batches(tf_engine, st_root, random_lora):
    cases.check_adapter_swap(tf_engine, st_root.layout, random_lora)


def test_broken_adapter_keeps_the_current_one(tf_engine, st_root):
    cases.check_bad_adapter_keeps_serving(tf_engine, st_root.layout)


def test_openai_client_on_transformers(tf_engine, st_root):
    cfg = st_root.config
    app = create_app(Settings(st_root.layout, cfg.server, cfg.model.id, own_engine=False, watch_adapters=False), tf_engine)
    with live_server(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=st_root.user_key, max_retries=0)
        msgs = [{"role": "user", "content": "What is the capital of France?"}]
        whole = client.chat.completions.create(model="m", messages=msgs, max_tokens=8, temperature=0)
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="m", messages=msgs, max_tokens=8, temperature=0, stream=True) if c.choices)
    assert whole.choices[0].message.content and streamed == whole.choices[0].message.content
