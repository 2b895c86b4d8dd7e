"""PII masking: valid check digits are masked, invalid ones left alone, and the text keeps its shape."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.pii import cn_id_valid, luhn_valid, mask, mask_messages


def test_cn_id_checksum():
    assert cn_id_valid("11010519491231002X")
    assert cn_id_valid("11010519491231002x")
    assert cn_id_valid("440524188001010014")
    assert not cn_id_valid("110105194912310021")  # wrong check digit
    assert not cn_id_valid("440524188001010015")
    assert not cn_id_valid("1101051949123100")


def test_luhn():
    assert luhn_valid("4111111111111111")
    assert luhn_valid("6011000990139424")
    assert not luhn_valid("4111111111111112")
    assert not luhn_valid("41111111111111a1")


@pytest.mark.parametrize("text, expected", [
    ("my id is 11010519491231002X.", "my id is [ID]."),
    ("ID 440524188001010014 on file", "ID [ID] on file"),
    ("order 110105194912310021 shipped", "order 110105194912310021 shipped"),  # bad check digit: not an ID
    ("card 4111 1111 1111 1111 expires", "card [CARD] expires"),
    ("card 4111-1111-1111-1111", "card [CARD]"),
    ("card 6011000990139424", "card [CARD]"),
    ("ref 4111111111111112", "ref 4111111111111112"),  # fails Luhn
    ("call 13812345678 now", "call [PHONE] now"),
    ("call +86 138-1234-5678", "call [PHONE]"),
    ("call 0086 13912345678", "call [PHONE]"),
    ("call 138 1234 5678", "call [PHONE]"),
    ("uk office +44 20 7946 0958", "uk office [PHONE]"),
    ("12812345678901 is a serial", "12812345678901 is a serial"),  # 14 digits, not a mobile, fails Luhn
    ("write to zhang.wei+ops@hospital.example.cn today", "write to [EMAIL] today"),
    ("host 192.168.10.254 is up", "host [IP] is up"),
    ("from 10.0.0.1, to 8.8.8.8", "from [IP], to [IP]"),
    ("version 1.2.3.4.5 and 256.1.1.1", "version 1.2.3.4.5 and 256.1.1.1"),
    ("port 8088 and 03:00 stay", "port 8088 and 03:00 stay"),
])
def test_mask_cases(text, expected):
    assert mask(text).text == expected


def test_counts_and_messages():
    msgs = [{"role": "user", "content": "I am 11010519491231002X, mail a@b.io, phone 13812345678"},
            {"role": "assistant", "content": "Noted; card 4111111111111111 from 10.1.2.3"}]
    out, counts = mask_messages(msgs)
    assert out[0]["role"] == "user"
    assert out[0]["content"] == "I am [ID], mail [EMAIL], phone [PHONE]"
    assert out[1]["content"] == "Noted; card [CARD] from [IP]"
    assert counts == {"ID": 1, "EMAIL": 1, "PHONE": 1, "CARD": 1, "IP": 1}


@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=200))
def test_idempotent(text):
    once = mask(text).text
    assert mask(once).text == once
