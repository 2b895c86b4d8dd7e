"""Scoring answers and the paired promotion decision, without a model."""

from __future__ import annotations

import json

import pytest

from appliance.trainer.data import Example, check_record
from appliance.trainer.promotion import Anchor, GateRules, Item, Losses, Outcome, decide
from appliance.trainer.scoring import key_recall, repetition_rate, score_answer, sign_test, token_f1, words
from appliance.trainer.split import Split, hold_back

RULES = GateRules(margin=0.05, max_p=0.05, max_broken=1, right_at=0.5, min_agreement=0.3, max_repetition=0.2,
                  anchor_tolerance=0.05)
CALM = Anchor(agreement=0.6, repetition=0.02, base_repetition=0.05)


def test_key_recall_is_case_insensitive_containment_of_every_key():
    assert key_recall("The API listens on port 8088.", ["8088"]) == 1.0
    assert key_recall("The appliance listens on port 8080.", ["8088"]) == 0.0
    assert key_recall("Edit /ETC/appliance/APPLIANCE.toml", ["/etc/appliance/appliance.toml"]) == 1.0
    assert key_recall("port 8088 on localhost", ["8088", "127.0.0.1"]) == 0.5
    assert key_recall("anything", []) == 0.0


def test_token_f1_against_the_reference():
    assert token_f1("The API listens on port 8088.", "The API listens on port 8088.") == 1.0
    assert token_f1("", "") == 1.0 and token_f1("", "something") == 0.0
    assert token_f1("nothing shared", "entirely different") == 0.0
    # 3 of 4 answer words in a 6-word reference: precision 3/4, recall 3/6
    assert token_f1("port 8088 by default", "the api uses port 8088 default") == pytest.approx(2 * 0.75 * 0.5 / 1.25)
    assert words("adp_adapter.gguf 端口8088") == ["adp", "adapter", "gguf", "端", "口", "8088"]


def test_score_uses_keys_when_the_example_has_them_else_f1():
    assert score_answer("It is 8080.", "The API listens on port 8088.", ("8088",)) == 0.0
    assert score_answer("The API listens on port 8088.", "The API listens on port 8088.") == 1.0


def test_repetition_rate_catches_a_loop_and_passes_fresh_text():
    loop = "appliance.adp_adapter_adapter_adapter_adapter_adapter_adapter_adapter_adapter_adapter_adapter_adapter"
    assert repetition_rate(loop) > 0.5
    assert repetition_rate("The capital of France is Paris, a city on the Seine.") == 0.0
    assert repetition_rate("Boil an egg: Boil an egg: Boil an egg: Boil an egg:") > 0.5
    assert repetition_rate("") == 0.0 and repetition_rate("two words") == 0.0


def test_sign_test_is_exact():
    assert sign_test(0, 0) == 1.0
    assert sign_test(5, 0) == pytest.approx(1 / 32)
    assert sign_test(4, 0) == pytest.approx(1 / 16)
    assert sign_test(8, 2) == pytest.approx(56 / 1024)
    assert sign_test(0, 3) == 1.0


def _items(pairs: list[tuple[float, float]]) -> tuple[Item, ...]:
    return tuple(Item(f"q{i}", r, c) for i, (r, c) in enumerate(pairs))


def test_a_clear_win_is_promoted_and_names_what_it_fixed():
    d = decide(Outcome("base model", _items([(0, 1)] * 8 + [(0, 0)] * 4), CALM), Losses(4.0, None, 3.0), RULES)
    assert d.promote, d.reason
    assert d.fixed == [f"q{i}" for i in range(8)] and d.broken == []
    assert "beats the base model's" in d.reason and d.p_value == pytest.approx(1 / 256)
    assert d.losses["candidate"] == 3.0  # kept for information
    json.dumps(d.to_json())


@pytest.mark.parametrize("pairs, anchor, losses, words", [
    # better on average but only 4 items: p = 1/16 is not below 0.05
    ([(0, 1)] * 4 + [(0, 0)] * 8, CALM, None, "sign test p = 0.0625 (not below 0.05)"),
    # gains 6, breaks 2: more broken than the one allowed
    ([(0, 1)] * 6 + [(1, 0)] * 2 + [(1, 1)] * 4, CALM, None, "2 items the active adapter answered right are wrong now"),
    # significant but a hair better on average: under the margin
    ([(0.5, 0.52)] * 10, CALM, None, "not the 0.050 margin"),
    # the loss-only gate's favourite: a far lower validation loss and no better answers
    ([(0, 0)] * 12, CALM, Losses(4.9, None, 3.1), "not the 0.050 margin"),
    ([(0, 1)] * 8, Anchor(0.6, 0.7, 0.05, "adp adapter adapter adapter"), None, "word 3-grams repeat"),
    ([(0, 1)] * 8, Anchor(0.1, 0.0, 0.05), None, "agree 10% with the base model's"),
    ([(0, 1)] * 8, None, None, "generic prompts were not answered"),
    ([], CALM, None, "no held-out item"),
    ([(0, 1)] * 8, CALM, Losses(4.0, 3.0, 2.0, anchor_reference=2.0, anchor_candidate=3.0), "earlier runs' validation data"),
])
def test_refusals_name_the_reason(pairs, anchor, losses, words):
    reference = "base model" if "active" not in words else "active adapter"
    d = decide(Outcome(reference, _items(pairs), anchor), losses, RULES)
    assert not d.promote and words in d.reason, d.reason
    assert any(not c["passed"] and words in c["detail"] for c in d.checks)


def test_broken_items_are_listed_and_a_few_are_tolerated():
    d = decide(Outcome("active adapter", _items([(0, 1)] * 9 + [(1, 0)]), CALM), None, RULES)
    assert d.promote and d.broken == ["q9"] and len(d.fixed) == 9


def test_a_repetitive_base_sets_its_own_bar():
    assert decide(Outcome("base model", _items([(0, 1)] * 8), Anchor(0.5, 0.3, 0.35)), None, RULES).promote


def _ex(q: str, a: str = "a") -> Example:
    return Example((("user", q), ("assistant", a)), "t")


def test_hold_back_is_deterministic_separate_from_validation_and_excludes_the_frozen_set():
    exs = [_ex(f"question {i}") for i in range(400)]
    parts = Split(exs[:360], exs[360:])
    rest, held, dropped = hold_back(parts, 0.1)
    assert len(held) == 36 and dropped == 0
    assert len(hold_back(parts, 0.1, max_prompts=10)[1]) == 10  # a large run holds back only what the gate asks
    assert rest.validation == parts.validation  # early stopping sees what it saw before
    assert not {e.prompt_key for e in held} & {e.prompt_key for e in rest.train}
    assert hold_back(parts, 0.1)[1] == held
    frozen = frozenset(e.prompt_key for e in exs[:5] + exs[-2:])
    rest2, _, dropped2 = hold_back(parts, 0.0, frozen)
    assert dropped2 == 7 and not frozen & {e.prompt_key for e in rest2.train + rest2.validation}
    assert hold_back(Split(exs[:1], exs[1:2]), 0.99)[1] == []  # never holds back everything


def test_a_record_carries_its_key():
    rec = {"messages": [{"role": "user", "content": "port?"}, {"role": "assistant", "content": "8088"}], "key": "8088"}
    assert check_record(rec).answer_keys == ("8088",)
    assert check_record(dict(rec, key=["8088", "127.0.0.1"])).answer_keys == ("8088", "127.0.0.1")
    with pytest.raises(ValueError, match="key is not"):
        check_record(dict(rec, key=[]))
    ex = Example(check_record(rec).messages, "s", ("8088",))
    assert Example.from_json(ex.to_json()) == ex
