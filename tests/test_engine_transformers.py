"""The server on the transformers (+peft) engine, with the openai client. (What every engine does,
this one included: tests/test_engines.py.)"""

from __future__ import annotations

import openai

from appliance.server.app import Settings, create_app
from tests.server_fixtures import live_server


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
