"""Replicas (one engine per GPU on multi-GPU tiers): requests spread by load, adapter swaps reach all."""

from __future__ import annotations

import dataclasses

import pytest

from appliance.engines import load_engine
from appliance.engines.replicas import ReplicaSet
from appliance.engines.scheduler import QueueFull
from appliance.errors import EngineError
from tests.server_fixtures import generate, make_root, submit
from tests.waiting import wait_until


@pytest.fixture(scope="module")
def pair(tmp_path_factory, smollm2_gguf):
    """Two llama.cpp engines behind one ReplicaSet (the dispatch does not depend on the backend)."""
    root = make_root(tmp_path_factory.mktemp("rep"), smollm2_gguf, max_batch=2, max_queue=0)
    engines = [load_engine(root.config.model, root.layout, max_batch=2, max_queue=0) for _ in range(2)]
    rs = ReplicaSet(engines)
    rs.start()
    yield rs
    rs.close()


def test_requests_spread_over_replicas_and_answers_match(pair):
    alone = generate(pair.engines[0], "Name a colour.", 8).text
    # ignore_eos: the four cannot end early, so all four are live at once
    held = [submit(pair, "Write a very long essay about the sea.", 300, ignore_eos=True) for _ in range(4)]
    wait_until(lambda: pair.live >= 4, "all four requests live")
    assert [e.live for e in pair.engines] == [2, 2] and pair.live == 4
    with pytest.raises(QueueFull, match="Each of the 2 replicas refused: ") as refused:
        for _ in range(3):
            submit(pair, "hello", 2)
    assert refused.value.code == "queue_full"
    for seq, _, _ in held:
        seq.cancel()
    for _, done, _ in held:
        assert done.wait(60)
    assert generate(pair, "Name a colour.", 8).text == alone


def test_adapter_swap_reaches_every_replica(pair):
    assert pair.swap_adapter(None, wait=60)
    assert all(e.adapter_id is None for e in pair.engines) and pair.adapter_error is None


def test_replicas_need_transformers_and_gpus(smollm2_gguf, tmp_path):
    root = make_root(tmp_path, smollm2_gguf)
    two = dataclasses.replace(root.config.model, replicas=2)
    with pytest.raises(EngineError, match="needs the transformers backend"):
        load_engine(two, root.layout, max_batch=2, max_queue=2)
    tf_two = dataclasses.replace(two, backend="transformers")
    import torch

    if torch.cuda.device_count() < 2:
        with pytest.raises(EngineError, match="needs 2 GPUs"):
            load_engine(tf_two, root.layout, max_batch=2, max_queue=2)


@pytest.mark.gpu
def test_transformers_replica_per_gpu(smollm2_safetensors, tmp_path):
    import torch

    n = torch.cuda.device_count()
    root = make_root(tmp_path, smollm2_safetensors, backend="transformers")
    model = dataclasses.replace(root.config.model, replicas=n, dtype="bfloat16")
    rs = load_engine(model, root.layout, max_batch=4, max_queue=4)
    rs.start()
    try:
        assert generate(rs, "What is 2 + 2?", 8).reason in ("stop", "length")
    finally:
        rs.close()
