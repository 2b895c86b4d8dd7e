"""The rest of the sampling surface through the official openai client on both engines: logprobs
(chat and completions), logit_bias, presence and frequency penalties, n > 1."""

from __future__ import annotations

import math

import pytest

from tests.openai_fixtures import MODEL, chat, serve


@pytest.fixture(scope="module", params=["llama.cpp", "transformers"])
def api(request):
    yield from serve(request)


Q = "What is the capital of France?"
COUNT = "Count from one to ten, separated by commas."


def test_chat_logprobs(api):
    r = chat(api, Q, 8, logprobs=True, top_logprobs=3)
    entries = r.choices[0].logprobs.content
    assert len(entries) == r.usage.completion_tokens
    assert "".join(e.token for e in entries) == r.choices[0].message.content
    for e in entries:
        tops = [t.logprob for t in e.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and all(lp <= 0 for lp in tops)
        # greedy: the chosen token is the likeliest, with the same log-probability
        assert e.top_logprobs[0].token == e.token and math.isclose(e.top_logprobs[0].logprob, e.logprob, abs_tol=1e-6)
        assert bytes(e.bytes) == e.token.encode()
    plain = chat(api, Q, 8)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == r.choices[0].message.content


def test_chat_logprobs_streamed(api):
    chunks = list(chat(api, Q, 6, logprobs=True, top_logprobs=1, stream=True))
    entries = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert len(entries) == 6 and all(len(e.top_logprobs) == 1 for e in entries)


def test_sampled_tokens_have_their_own_logprob(api):
    r = chat(api, Q, 8, logprobs=True, top_logprobs=5, temperature=1.0, seed=11)
    for e in r.choices[0].logprobs.content:
        top = {t.token: t.logprob for t in e.top_logprobs}
        assert e.token not in top or math.isclose(top[e.token], e.logprob, abs_tol=1e-6)


def test_completion_logprobs(api):
    c = api.client.completions.create(model=MODEL, prompt="One, two, three,", max_tokens=4, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == c.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(4)]
    assert all(len(t) <= 2 and max(t.values()) == pytest.approx(v, abs=1e-6) for t, v in zip(lp.top_logprobs, lp.token_logprobs, strict=True))


def test_logit_bias_bans_and_forces_tokens(api):
    base = chat(api, Q, 8, logprobs=True)
    first = base.choices[0].logprobs.content[0].token
    first_id = api.engine.tokenize(first)
    assert len(first_id) == 1
    banned = chat(api, Q, 8, logit_bias={str(first_id[0]): -100}, logprobs=True)
    assert banned.choices[0].logprobs.content[0].token != first
    (word,) = api.engine.tokenize(" banana")
    forced = chat(api, Q, 3, logit_bias={str(word): 100})
    assert forced.choices[0].message.content == " banana" * 3


def test_a_logit_bias_token_out_of_the_vocabulary_is_a_400(api):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        chat(api, Q, 2, logit_bias={"999999999": 5})
    assert e.value.body["param"] == "logit_bias" and "token id the model does not have" in e.value.body["message"]


@pytest.mark.parametrize("penalty", ["frequency_penalty", "presence_penalty"])
def test_penalties_change_the_answer(api, penalty):
    plain = chat(api, COUNT, 24).choices[0].message.content
    tokens = api.engine.tokenize(plain)
    assert len(set(tokens)) < len(tokens)  # the plain answer repeats tokens, which the penalty makes less likely
    penalised = chat(api, COUNT, 24, **{penalty: 2.0}).choices[0].message.content
    assert penalised != plain


def test_n_answers_in_one_batch(api):
    steps = api.engine.steps
    r = chat(api, Q, 8, n=2, temperature=1.0, seed=5)
    assert [c.index for c in r.choices] == [0, 1] and all(c.message.content for c in r.choices)
    assert r.usage.completion_tokens >= 2 and r.usage.completion_tokens <= 16
    assert api.engine.steps - steps <= 8 + 1  # decoded side by side, not one after the other
    again = chat(api, Q, 8, n=2, temperature=1.0, seed=5)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]  # seeded: seed, seed+1
    chunks = list(chat(api, Q, 4, n=2, stream=True))
    assert {c.choices[0].index for c in chunks} == {0, 1}
    assert sum(1 for c in chunks if c.choices[0].finish_reason) == 2
