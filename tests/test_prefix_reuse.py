"""Prefix reuse on the llama.cpp engine (SmolLM2 GGUF): a prompt that starts like a cached one (the same
long system prompt, a chat's earlier turns resent as history) reuses those KV cells, and greedy answers
are the same as without reuse (up to a near tie, see `same_greedy`)."""

from __future__ import annotations

import pytest

from appliance.engines.prefix_cache import PrefixIndex, PrefixStore, common_prefix
from appliance.engines.scheduler import SamplingParams, generate
from appliance.engines.sequences import Finished
from tests.server_fixtures import install_adapter, make_root
from tests.waiting import wait_until

SYSTEM = ("You are the help desk of the Northwind water utility. " +
          " ".join(f"Rule {i}: answer briefly, cite the customer's meter number, and never promise a repair date." for i in range(12)))
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, logprobs=5)
NEAR_TIE = 0.3  # nats between the two likeliest tokens where another rounding may pick the other one


@pytest.fixture(scope="module")
def reuse_root(tmp_path_factory, smollm2_gguf):
    return make_root(tmp_path_factory.mktemp("reuse"), smollm2_gguf, max_batch=3, context=1024)


@pytest.fixture
def engine(reuse_root):
    """A fresh engine per test: what is cached depends only on the test's own requests."""
    from appliance.engines import load_engine

    cfg = reuse_root.config
    e = load_engine(cfg.model, reuse_root.layout, max_batch=cfg.server.max_batch, max_queue=cfg.server.max_queue)
    e.start()
    yield e
    e.close()


def chat(engine, messages) -> list[int]:
    return engine.tokenize(engine.render_chat(messages))


def answer(engine, prompt: list[int], params: SamplingParams = GREEDY):
    return generate(engine, prompt, params, 300)


def answers(engine, prompts: list[list[int]]) -> list[Finished]:
    """Submitted all at once, so they are admitted together."""
    boxes: list[list] = [[] for _ in prompts]
    for p, box in zip(prompts, boxes, strict=True):
        engine.submit(p, GREEDY, box.append)
    wait_until(lambda: all(box and isinstance(box[-1], Finished) for box in boxes), "every answer", 300)
    return [box[-1] for box in boxes]


def without_reuse(engine, prompts: list[list[int]]) -> list[Finished]:
    """The answers with every cached cell ignored (each prompt prefilled whole)."""
    backend = engine.backend
    real = backend.index.best, backend.saved.get
    backend.index.best = backend.saved.get = lambda *a: (None, 0)
    try:
        return [answer(engine, p) for p in prompts]
    finally:
        backend.index.best, backend.saved.get = real


def same_greedy(got: list[Finished], want: list[Finished]) -> bool:
    """Each answer computed from reused cells is the one computed whole, token by token, up to the first
    near tie: llama.cpp rounds a prompt cut into other calls differently (bench/RESULTS.md), which on some
    CPUs flips two tokens whose log-probabilities are within NEAR_TIE; after that the answers may part.
    Cells from another prompt or position would differ from the first token on, by far more."""
    for g, w in zip(got, want, strict=True):
        a, b = [lp.token for lp in g.logprobs], [lp.token for lp in w.logprobs]
        i = next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
        if i is None:  # the same tokens (one may have ended sooner: an end token is not kept, nor its log-probability)
            continue
        top = dict(w.logprobs[i].top)
        assert a[i] in top and w.logprobs[i].logprob - top[a[i]] < NEAR_TIE, (
            f"token {i} differs beyond a near tie: {g.text!r} against {w.text!r}")
    return True


def test_longest_match_wins_and_least_recently_used_goes_first():
    index = PrefixIndex()
    index.set(0, [1, 2, 3], "base")
    index.set(1, [1, 2, 3, 4, 5], "base")
    index.set(2, [1, 2, 3, 4, 5, 6], "lora")  # computed under other weights: never a match for "base"
    assert index.best([1, 2, 3, 4, 9], "base", [0, 1, 2]) == (1, 4)
    assert index.best([7], "base", [0, 1, 2]) == (None, 0)
    index.touch(0)
    assert index.oldest([0, 1, 2]) == 1 and index.oldest([0, 3]) == 3  # an empty slot goes first
    assert common_prefix([1, 2], [1, 2, 3]) == 2


def test_the_store_keeps_the_longest_of_a_chat_and_drops_the_least_recently_used_beyond_its_bytes():
    store = PrefixStore(max_bytes=100)
    store.put([1, 2], "base", "turn 1", 40)
    store.put([1, 2, 3, 4], "base", "turn 2", 40)  # extends turn 1, which goes
    store.put([5, 6], "base", "other", 40)
    assert store.nbytes == 80 and store.get([1, 2, 3, 9], "base") == ("turn 2", 3)
    assert store.covers([1, 2, 3], "base") and not store.covers([1, 2, 3], "lora") and not store.covers([5, 6, 7], "base")
    store.put([7, 8], "base", "third", 40)  # over 100 bytes: "other" was used least recently
    assert store.get([5, 6], "base") == (None, 0) and store.get([1, 2], "base") == ("turn 2", 2) and store.nbytes == 80
    store.put([9], "base", "too big", 101)
    assert store.get([9], "base") == (None, 0)


def host_cache_engine(root, mib: int):
    from appliance.engines import load_engine

    cfg = root.config
    e = load_engine(cfg.model, root.layout, max_batch=cfg.server.max_batch, max_queue=cfg.server.max_queue, prefix_cache_mib=mib)
    e.start()
    return e


def test_more_long_prompts_than_slots_get_their_cells_back_from_host_memory(reuse_root):
    """Four chats with long system prompts of their own on three slots: the fourth takes the first one's
    slot, which is saved first; when the first chat comes back its cells are put back, not prefilled,
    and the greedy answer is the same (the same cells). With prefix_cache_mib = 0 nothing is kept beyond
    the slots (and the answer may differ: a prompt prefilled from another offset is cut into other sub-batches)."""
    results = {}
    for mib in (64, 0):
        engine = host_cache_engine(reuse_root, mib)
        try:
            prompts = [chat(engine, [{"role": "system", "content": f"Site {i} of {4}. {SYSTEM}"}, {"role": "user", "content": "Who are you?"}])
                       for i in range(4)]
            first = [answer(engine, p).text for p in prompts]
            before, restored = engine.prefix_reused_tokens, engine.backend.restored_tokens
            again = answer(engine, prompts[0]).text
            results[mib] = (first[0], again, engine.prefix_reused_tokens - before, engine.backend.restored_tokens - restored)
            assert engine.backend.saved.nbytes <= mib << 20
        finally:
            engine.close()
    first, again, reused, restored = results[64]
    assert again == first and reused == restored == len(prompts[0]) - 1
    _, _, reused, restored = results[0]
    assert reused < 16 and restored == 0  # the system prompts' first words at most


def test_shared_system_prompt_is_prefilled_once(engine):
    questions = ["My meter reads 0042, is that normal?", "Why is my bill higher this month?"]
    prompts = [chat(engine, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]) for q in questions]
    shared = common_prefix(*prompts)
    assert shared > 200
    expected = without_reuse(engine, prompts)
    before = engine.prefix_reused_tokens
    got = [answer(engine, p) for p in prompts]
    assert same_greedy(got, expected)
    # the second reuses the first's system prompt (the first finds the second-to-last of the no-reuse run)
    assert engine.prefix_reused_tokens - before >= 2 * shared
    from appliance.server.metrics import Metrics

    metrics = Metrics()
    metrics.bind_engine(engine)
    assert f"appliance_prefix_reused_tokens_total {float(engine.prefix_reused_tokens)}" in metrics.render().decode()


def test_a_chats_earlier_turns_are_not_prefilled_again(engine):
    first = [{"role": "user", "content": "Name a large river in Europe."}]
    p1 = chat(engine, first)
    a1 = answer(engine, p1).text
    second = [*first, {"role": "assistant", "content": a1}, {"role": "user", "content": "Which countries does it cross?"}]
    p2 = chat(engine, second)
    expected = without_reuse(engine, [p2])
    engine.backend.index.clear()  # nothing cached but what this turn's first request leaves
    assert answer(engine, p1).text == a1
    before = engine.prefix_reused_tokens
    assert same_greedy([answer(engine, p2)], expected)
    assert engine.prefix_reused_tokens - before >= len(p1)  # the first turn's prompt, and its answer's tokens


def test_a_live_sequences_cells_are_copied_to_a_newcomer(engine):
    """The longest match is a sequence still decoding: its cells are copied (another KV stream), not shared."""
    system = SYSTEM.replace("Northwind", "Southbay")
    long_one = chat(engine, [{"role": "system", "content": system}, {"role": "user", "content": "Write a long essay on water."}])
    newcomer = chat(engine, [{"role": "system", "content": system}, {"role": "user", "content": "What is a meter?"}])
    expected = without_reuse(engine, [newcomer])
    engine.backend.index.clear()
    events: list = []
    held = engine.submit(long_one, SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True), events.append)
    try:
        wait_until(lambda: events, "the long answer started")
        before = engine.prefix_reused_tokens
        assert same_greedy([answer(engine, newcomer)], expected)
        assert engine.prefix_reused_tokens - before >= common_prefix(long_one, newcomer)
        assert engine.live == 1  # the long one goes on in its own slot
    finally:
        held.cancel()
        wait_until(lambda: engine.live == 0, "the long answer cancelled")


def test_an_adapter_swap_forgets_every_cached_cell(engine, reuse_root, random_lora):
    from appliance import adapters

    prompt = chat(engine, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello?"}])
    for adapter_id in ("lora-a", "lora-b"):
        install_adapter(reuse_root.layout, adapter_id, random_lora)
        assert engine.swap_adapter(adapters.active_adapter(reuse_root.layout), wait=300) and engine.adapter_id == adapter_id
        before = engine.prefix_reused_tokens
        answer(engine, prompt)
        # cells computed under the previous adapter are not reused: at most the template's preamble
        assert engine.prefix_reused_tokens - before <= len(engine.backend.prefix)
    before = engine.prefix_reused_tokens
    answer(engine, prompt)
    assert engine.prefix_reused_tokens - before == len(prompt) - 1  # same adapter: all but the last token
    assert engine.swap_adapter(None, wait=300)


def test_greedy_answers_match_with_every_request_in_one_batch(engine):
    """Three requests admitted together, two sharing the system prompt: answers as without reuse."""
    prompts = [chat(engine, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}])
               for q in ("Is tap water safe?", "How do I read my meter?", "Can I pay later?")]
    expected = without_reuse(engine, prompts)
    answers(engine, prompts[:1])  # cached: the next three find its system prompt
    assert same_greedy(answers(engine, prompts), expected)


def test_requests_that_arrive_together_compute_their_system_prompt_once(engine):
    """Nothing cached, three requests at once with one system prompt: the first prefills it, the other
    two wait and copy its cells instead of each computing them; answers as without reuse."""
    prompts = [chat(engine, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}])
               for q in ("Is tap water safe?", "How do I read my meter?", "Can I pay later?")]
    shared = min(common_prefix(prompts[0], p) for p in prompts[1:])
    expected = without_reuse(engine, prompts)
    engine.backend.index.clear()  # not even the template's preamble is cached now
    before = engine.prefix_reused_tokens
    assert same_greedy(answers(engine, prompts), expected)
    assert engine.prefix_reused_tokens - before >= 2 * shared


def test_waiting_requests_go_on_alone_when_the_one_they_wait_for_is_cancelled(engine):
    prompts = [chat(engine, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}])
               for q in ("Is tap water safe?", "How do I read my meter?", "Can I pay later?")]
    expected = without_reuse(engine, prompts[1:])
    engine.backend.index.clear()
    engine.prefill_chunk = 32  # the system prompt takes the first request several steps
    boxes: list[list] = [[] for _ in prompts]
    seqs = [engine.submit(p, GREEDY, box.append) for p, box in zip(prompts, boxes, strict=True)]
    engine.on_step = lambda e: seqs[0].cancel()  # after its first chunk, long before the others' shared part is in
    wait_until(lambda: all(box and isinstance(box[-1], Finished) for box in boxes), "every answer", 300)
    engine.on_step = None
    assert boxes[0][-1].reason == "cancelled" and boxes[0][-1].completion_tokens == 0
    assert same_greedy([box[-1] for box in boxes[1:]], expected)


def test_transformers_reuses_saved_cells_and_answers_the_same(tf_engine, monkeypatch):
    """The transformers engine saves a finished row's cells: a shared system prompt and a chat's earlier
    turn are not prefilled again, rows with different reused lengths share one batch, answers unchanged."""
    engine, backend = tf_engine, tf_engine.backend
    system = SYSTEM[:900]
    first = [{"role": "system", "content": system}, {"role": "user", "content": "Name a large river in Europe."}]
    p1 = chat(engine, first)
    a1 = answer(engine, p1).text
    p2 = chat(engine, [*first, {"role": "assistant", "content": a1}, {"role": "user", "content": "Which countries does it cross?"}])
    p3 = chat(engine, [{"role": "system", "content": system}, {"role": "user", "content": "Why is my bill high?"}])
    p4 = chat(engine, [{"role": "user", "content": "What is 2 + 2?"}])
    with monkeypatch.context() as m:
        m.setattr(backend, "_reusable", lambda text, adapter: (None, 0))
        expected = [answer(engine, p).text for p in (p2, p3, p4)]
    backend.saved.clear()
    assert answer(engine, p1).text == a1
    before = engine.prefix_reused_tokens
    assert [f.text for f in answers(engine, [p2, p3, p4])] == expected  # reused: all of p1 and its answer, the system prompt, the preamble
    assert engine.prefix_reused_tokens - before >= len(p1) + common_prefix(p1, p3) + len(backend.prefix)
    assert 0 < backend.saved.nbytes <= backend.saved.max_bytes
