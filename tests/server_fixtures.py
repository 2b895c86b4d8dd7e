"""Fixtures for the server and engine tests: a temporary installed root, engines on SmolLM2, live servers."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from appliance import apikeys
from appliance.config import Config, load_config
from appliance.paths import Layout
from tests.waiting import wait_until

REPO = Path(__file__).resolve().parent.parent
MODEL_DIR = "/var/lib/appliance/models/smollm2"

CONFIG = """\
[server]
host = "127.0.0.1"
port = 8088
max_queue = {max_queue}
max_batch = {max_batch}
request_body_limit = 65536
audit_prompts = false

[model]
tier = "cpu"
id = "smollm2-135m-instruct"
backend = "{backend}"
path = "{path}"
context_length = {context}
threads = {threads}
gpu_layers = 0
dtype = "float32"
replicas = 1

[trainer]
lora_rank = 8
"""


@dataclass
class Root:
    layout: Layout
    config: Config
    admin_key: str
    user_key: str


def make_root(base: Path, model_file: Path, *, backend: str = "llama.cpp", max_batch: int = 4, max_queue: int = 8,
              context: int = 512, threads: int = 1) -> Root:
    """An installed-looking tree: config, the model under var/lib (a link), an admin and a user key.

    One thread by default: on this shared 2-core machine a second spinning thread slows llama.cpp
    and torch down by an order of magnitude when the other core is busy.
    """
    layout = Layout.at(base)
    target = f"{MODEL_DIR}/{model_file.name}"
    dest = layout.root / target.lstrip("/")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.symlink_to(model_file)
    layout.etc.mkdir(parents=True, exist_ok=True)
    layout.config_file.write_text(CONFIG.format(backend=backend, path=target, max_batch=max_batch, max_queue=max_queue, context=context,
                                                  threads=threads))
    _, admin = apikeys.create(layout, "admin")
    _, user = apikeys.create(layout, "user")
    return Root(layout, load_config(layout), admin, user)


def scripted_root(base: Path, **settings: object) -> Root:
    """make_root's tree for the scripted engine (tests/scripted_engine.py): its model file is never read."""
    base.mkdir(parents=True, exist_ok=True)
    (base / "model.gguf").write_bytes(b"GGUF")
    return make_root(base / "root", base / "model.gguf", **settings)  # type: ignore[arg-type]


@contextlib.contextmanager
def running(engine: Any) -> Iterator[Any]:
    """An engine started for the block, closed after it."""
    engine.start()
    try:
        yield engine
    finally:
        engine.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def live_server(app: object) -> Iterator[str]:
    """A real uvicorn on 127.0.0.1 and a random free port, in a thread; yields the base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    wait_until(lambda: server.started or not t.is_alive(), "uvicorn started")
    assert server.started, "uvicorn stopped before it started"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        t.join(timeout=30)


@pytest.fixture(scope="module")
def gguf_root(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path) -> Root:
    return make_root(tmp_path_factory.mktemp("root"), smollm2_gguf)


@pytest.fixture(scope="module")
def llama_engine(gguf_root: Root) -> Iterator[object]:
    from appliance.engines import load_engine

    cfg = gguf_root.config
    engine = load_engine(cfg.model, gguf_root.layout, max_batch=cfg.server.max_batch, max_queue=cfg.server.max_queue)
    engine.start()
    yield engine
    engine.close()


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


@pytest.fixture(scope="session")
def smollm2_safetensors(smollm2_gguf: Path) -> Path:
    """SmolLM2 as a safetensors directory, converted once from the GGUF and cached under build/."""
    out = REPO / "build" / "test-models" / "smollm2-135m-safetensors"
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    from filelock import FileLock

    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if not (out / "config.json").is_file():
            import shutil

            from appliance.trainer.base_model import dequantize_gguf

            tmp = out.with_name(out.name + ".partial")
            shutil.rmtree(tmp, ignore_errors=True)
            dequantize_gguf(smollm2_gguf, tmp)
            tmp.rename(out)
    return out


@pytest.fixture(scope="session")
def random_lora(smollm2_safetensors: Path) -> Path:
    """A LoRA for SmolLM2 with random (non-zero) B matrices, so it visibly changes answers:
    `peft/` (PEFT safetensors) and `adapter.gguf` (llama.cpp), made once and cached under build/."""
    out = REPO / "build" / "test-models" / "smollm2-lora-random"
    if (out / "adapter.gguf").is_file():
        return out
    import json
    import shutil

    import torch
    from filelock import FileLock
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from appliance.trainer.export import write_gguf_lora

    with FileLock(str(out) + ".lock"):  # once, whoever asks first (a test run beside another)
        if (out / "adapter.gguf").is_file():
            return out
        tmp = out.with_name(out.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(smollm2_safetensors, dtype=torch.float32)
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        model.save_pretrained(tmp / "peft")
        write_gguf_lora(tmp / "peft", tmp / "adapter.gguf", json.loads((smollm2_safetensors / "config.json").read_text()))
        tmp.rename(out)
    return out


def install_adapter(layout: Layout, adapter_id: str, source: Path, *, activate: bool = True) -> None:
    """Register a copy of `source` (peft/ and adapter.gguf) as adapter `adapter_id`, and promote it."""
    import shutil

    from appliance import adapters

    staged = adapters.staging_dir(layout, adapter_id)
    shutil.copytree(source / "peft", staged / "peft")
    shutil.copy(source / "adapter.gguf", staged / "adapter.gguf")
    adapters.register(layout, adapter_id, staged, {"created_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "base": "smollm2"})
    if activate:
        adapters.promote(layout, adapter_id)


def submit(engine, question: str, max_tokens: int = 24, **params) -> tuple[object, threading.Event, list]:
    """Submit a one-message chat; returns (sequence, done event, events list)."""
    from appliance.engines.scheduler import Finished, SamplingParams

    events: list = []
    done = threading.Event()

    def sink(ev: object) -> None:
        events.append(ev)
        if isinstance(ev, Finished):
            done.set()

    params.setdefault("temperature", 0.0)
    tokens = engine.tokenize(engine.render_chat([{"role": "user", "content": question}]))
    seq = engine.submit(tokens, SamplingParams(max_tokens=max_tokens, **params), sink)
    return seq, done, events


def generate(engine, question: str, max_tokens: int = 24, **params):
    """The Finished event of one request (greedy unless told otherwise)."""
    _, done, events = submit(engine, question, max_tokens, **params)
    assert done.wait(300), "generation did not finish"
    return events[-1]


def generate_together(engine, questions: list[str], max_tokens: int = 24, **params) -> list:
    """Submit all at once (so they share batches); Finished events in question order."""
    subs = [submit(engine, q, max_tokens, **params) for q in questions]
    for _, done, _ in subs:
        assert done.wait(300), "generation did not finish"
    return [events[-1] for _, _, events in subs]
