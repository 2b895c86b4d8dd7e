"""Fixtures for the server and engine tests: a temporary installed root, engines on SmolLM2, live servers."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance import apikeys
from appliance.config import Config, load_config
from appliance.paths import Layout

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
threads = 2
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
              context: int = 512) -> Root:
    """An installed-looking tree: config, the model under var/lib (a link), an admin and a user key."""
    layout = Layout.at(base)
    target = f"{MODEL_DIR}/{model_file.name}"
    dest = layout.root / target.lstrip("/")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.symlink_to(model_file)
    layout.etc.mkdir(parents=True, exist_ok=True)
    layout.config_file.write_text(CONFIG.format(backend=backend, path=target, max_batch=max_batch, max_queue=max_queue, context=context))
    _, admin = apikeys.create(layout, "admin")
    _, user = apikeys.create(layout, "user")
    return Root(layout, load_config(layout), admin, user)


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
    deadline = time.monotonic() + 120
    while not server.started:
        if not t.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
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
            from transformers import AutoModelForCausalLM, AutoTokenizer

            tmp = out.with_name(out.name + ".partial")
            kw = {"gguf_file": smollm2_gguf.name}
            AutoTokenizer.from_pretrained(smollm2_gguf.parent, **kw).save_pretrained(tmp)
            AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, **kw).save_pretrained(tmp)
            tmp.rename(out)
    return out
