"""The official openai client against a live server on each real engine (llama.cpp on the GGUF,
transformers on the same model as safetensors): what test_structured_output.py, test_tools.py and
test_sampling.py share."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import openai
import pytest

from appliance.server.app import Settings, create_app
from tests.server_fixtures import live_server

MODEL = "smollm2-135m-instruct"


@dataclass
class Api:
    client: openai.OpenAI
    url: str
    key: str
    engine: object
    backend: str

    def aclient(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=self.key, max_retries=0)


def serve(request: pytest.FixtureRequest) -> Iterator[Api]:
    """Body of a module fixture parametrized with the backend names."""
    if request.param == "llama.cpp":
        engine, root = request.getfixturevalue("llama_engine"), request.getfixturevalue("gguf_root")
    else:
        engine, root = request.getfixturevalue("tf_engine"), request.getfixturevalue("st_root")
    cfg = root.config
    with live_server(create_app(Settings(root.layout, cfg.server, cfg.model.id, own_engine=False), engine)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=root.user_key, max_retries=0, timeout=300)
        yield Api(client, url, root.user_key, engine, request.param)
        client.close()


def chat(api: Api, question: str, max_tokens: int = 16, **kw: object) -> object:
    """One greedy chat completion of `question`."""
    kw.setdefault("temperature", 0)
    return api.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}],
                                              max_tokens=max_tokens, **kw)
