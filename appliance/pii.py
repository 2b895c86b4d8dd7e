"""Mask personal data before anything is stored or trained. Pure functions: text in, text out.

Masked text keeps its shape: each finding becomes a placeholder such as `[ID]` or `[PHONE]`, so a
sentence still reads as a sentence and the model learns that such a value goes there.
Numbers that only look like an ID or a card (wrong check digit) are left alone: masking them would
destroy order numbers and serials the site does want the model to learn. For the same reason the
machine's own addresses (loopback, unspecified) and the networks a site names (`keep`, from
[trainer] keep_networks: its server subnet, say) stay as they are.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"

# Letters of any script (IDN addresses such as zhang@例子.中国 or jörg@bücher.de), a dot-separated
# domain whose last label is letters, or its punycode (xn--fiqs8s).
_EMAIL = re.compile(r"(?<![\w.+-])[\w.%+-]+@[^\W_](?:[\w-]*[^\W_])?(?:\.[^\W_](?:[\w-]*[^\W_])?)*"
                    r"\.(?:[^\W\d_]{2,}|xn--[a-z0-9-]*[a-z0-9])(?![\w-])", re.IGNORECASE)
# 17 digits and a check character (digit or X), not glued to other digits or letters; written whole
# or grouped by single spaces or hyphens however the writer grouped them (110105 19491231 002X,
# 110105 1949 1231 002X, 1101 0519 4912 3100 2X); the check digit and birth date decide.
_CN_ID = re.compile(r"(?<![0-9A-Za-z])\d(?:[ -]?\d){16}[ -]?[\dXx](?![0-9A-Za-z])")
# 13-19 digits, optionally grouped by single spaces or hyphens (how cards are written by hand).
_CARD = re.compile(r"(?<![\d+-])\d(?:[ -]?\d){12,18}(?![\d])")
# Mainland mobiles: 1[3-9]x xxxx xxxx with an optional +86/0086 prefix; and other E.164 numbers
# written with a leading +.
_CN_MOBILE = re.compile(r"(?<![\d+])(?:(?:\+|00)86[ -]?)?1[3-9]\d[ -]?\d{4}[ -]?\d{4}(?!\d)")
_INTL_PHONE = re.compile(r"(?<![\w+])\+[1-9]\d{0,2}(?:[ -]?\(?\d{1,4}\)?){2,5}(?!\d)")
# Mainland landlines: an area code (010, 021, 0755, ...) set off by a separator or parentheses, then
# 7 or 8 digits: 010-12345678, (0755) 1234 5678, 021 6123 4567. A bare run of digits is left alone.
_CN_LANDLINE = re.compile(r"(?<![\w+])(?:\(0[1-9]\d{1,2}\)[ -]?|0[1-9]\d{1,2}[ -])\d{3,4}[ -]?\d{4}(?![\w-])")
# IPv6, compressed or not, optionally ending in a dotted IPv4 part; ipaddress decides what is one.
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:(?:\d{1,3}\.){3}\d{1,3}|[0-9A-Fa-f]{1,4})?(?![\w:]|\.\d)")
_IPV4 = re.compile(r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\d]|\.\d)")


def cn_id_valid(number: str) -> bool:
    """True if `number` (grouping spaces or hyphens aside) is an 18-character mainland resident ID
    whose check character is right."""
    number = re.sub(r"[ -]", "", number)
    if len(number) != 18 or not number[:17].isdigit():
        return False
    year, month, day = int(number[6:10]), int(number[10:12]), int(number[12:14])
    if not (1800 <= year <= 2099 and 1 <= month <= 12 and 1 <= day <= 31):
        return False  # no birth date: a serial that happens to have a fitting last digit
    total = sum(int(d) * w for d, w in zip(number[:17], _ID_WEIGHTS, strict=True))
    return _ID_CHECK[total % 11] == number[17].upper()


def luhn_valid(digits: str) -> bool:
    """The Luhn check used by payment cards (digits only)."""
    if not digits.isdigit():
        return False
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


@dataclass
class MaskResult:
    text: str
    counts: Counter[str] = field(default_factory=Counter)


def _sub(pattern: re.Pattern[str], tag: str, text: str, counts: Counter[str], check=None) -> str:
    def repl(m: re.Match[str]) -> str:
        if check is not None and not check(m.group(0)):
            return m.group(0)
        counts[tag] += 1
        return f"[{tag}]"

    return pattern.sub(repl, text)


def _card(m: re.Match[str], counts: Counter[str]) -> str:
    """The longest Luhn-valid card at the start of the match, ending where a group ends: a card
    written with more digits after it (an expiry, a CVV) is still found; what follows is kept."""
    s = m.group(0)
    ends = [i + 1 for i, ch in enumerate(s) if ch.isdigit() and (i + 1 == len(s) or not s[i + 1].isdigit())]
    for end in reversed(ends):
        digits = re.sub(r"[ -]", "", s[:end])
        if 13 <= len(digits) <= 19 and luhn_valid(digits):
            counts["CARD"] += 1
            return "[CARD]" + s[end:]
    return s


def parse_networks(values: Iterable[str]) -> tuple[Network, ...]:
    """Networks written as `10.0.0.0/8` or `fd00::/8` (a bare address is a /32 or /128); ValueError
    naming the first that is not one."""
    out = []
    for v in values:
        try:
            out.append(ipaddress.ip_network(v.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{v!r} is not an IP network; write it like 10.0.0.0/8 or fd00::/8") from None
    return tuple(out)


def _public_ip(s: str, keep: tuple[Network, ...] = ()) -> bool:
    """An address that points at someone: loopback and the unspecified address (0.0.0.0, ::) are
    the machine's own and stay, so the model can learn "the API listens on 127.0.0.1:8088"; so do
    addresses in the networks the site keeps."""
    try:
        ip = ipaddress.ip_address(s)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not (ip.is_loopback or ip.is_unspecified or any(ip in n for n in keep))


def _intl_ok(s: str) -> bool:
    return 8 <= len(re.sub(r"\D", "", s)) <= 15


def mask(text: str, keep: tuple[Network, ...] = ()) -> MaskResult:
    """Replace e-mail addresses, CN resident IDs, bank cards, phone numbers and IP addresses (but
    loopback, unspecified and those in `keep`)."""
    counts: Counter[str] = Counter()
    # Order matters: e-mails first (they contain digits), IDs before cards (an 18-digit ID can pass
    # Luhn by chance), mainland mobiles before cards (+86 and a mobile make 13 digits that can pass
    # Luhn by chance); the mobile pattern needs digit boundaries, so it never bites into a card.
    text = _sub(_EMAIL, "EMAIL", text, counts)
    text = _sub(_CN_ID, "ID", text, counts, cn_id_valid)
    text = _sub(_CN_MOBILE, "PHONE", text, counts)
    text = _CARD.sub(lambda m: _card(m, counts), text)
    text = _sub(_INTL_PHONE, "PHONE", text, counts, _intl_ok)
    text = _sub(_CN_LANDLINE, "PHONE", text, counts)
    text = _sub(_IPV6, "IP", text, counts, lambda s: _public_ip(s, keep))
    text = _sub(_IPV4, "IP", text, counts, lambda s: _public_ip(s, keep))
    return MaskResult(text, counts)


def mask_text(text: str, keep: tuple[Network, ...] = ()) -> str:
    return mask(text, keep).text


def _mask_value(value: Any, keep: tuple[Network, ...]) -> Any:
    if isinstance(value, str):
        return mask_text(value, keep)
    if isinstance(value, list):
        return [_mask_value(v, keep) for v in value]
    if isinstance(value, dict):
        return {mask_text(k, keep): _mask_value(v, keep) for k, v in value.items()}
    return value


def mask_line(line: str, keep: tuple[Network, ...] = ()) -> str:
    """One line of a JSONL file, masked: a JSON line string by string, after decoding, since escapes
    (`zhang@\\u4f8b\\u5b50.\\u4e2d\\u56fd`, what `json.dumps` writes by default) hide a value from
    the patterns; a line that is not JSON as text. The line ending stays."""
    body = line.rstrip("\r\n")
    try:
        value = json.loads(body)
    except ValueError:
        return mask_text(line, keep)
    return json.dumps(_mask_value(value, keep), ensure_ascii=False) + line[len(body):]


def mask_messages(messages: list[dict], keep: tuple[Network, ...] = ()) -> tuple[list[dict], Counter[str]]:
    """Mask every message's content; return new messages and the counts per kind."""
    total: Counter[str] = Counter()
    out = []
    for m in messages:
        r = mask(str(m.get("content", "")), keep)
        total.update(r.counts)
        out.append({**m, "content": r.text})
    return out, total
