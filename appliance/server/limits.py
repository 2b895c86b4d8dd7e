"""Per-key rate limits and concurrency quotas: requests and tokens per minute, live sequences.

Sliding windows of 60 s, kept in memory per key (a restart forgets them; they bound abuse, not
billing). A generating request is admitted while its key is under every limit: fewer than `rpm`
admissions in the last minute, fewer than `tpm` tokens charged in the last minute and fewer than
`max_live` sequences queued or decoding. Tokens are charged when they are known: the prompt when
the sequence is submitted, the answer when it finishes (also when cancelled, for what was
generated), so one request may overshoot `tpm` by its own size and the next one waits for the
window to drain. A refusal says how long until the window admits again (Retry-After).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from appliance.apikeys import KeyRecord
from appliance.config import ServerConfig

WINDOW = 60.0


@dataclass(frozen=True)
class Refused:
    """Why a key may not start another request now, and when it may."""

    message: str
    retry_after: int  # whole seconds, at least 1
    code: str


@dataclass
class _Usage:
    requests: deque[float] = field(default_factory=deque)
    tokens: deque[tuple[float, int]] = field(default_factory=deque)
    live: int = 0


def _limit(own: int | None, default: int) -> int:
    return default if own is None else own


def _seconds(s: float) -> int:
    return max(1, math.ceil(s - 1e-9))


class Lease:
    """One admitted request: charge its tokens, free its live slot once (idempotent)."""

    def __init__(self, limiter: Limiter, key_id: str) -> None:
        self._limiter, self.key_id = limiter, key_id
        self.handed_over = False  # the sequence's end releases it, not the route
        self._released = False

    def charge(self, tokens: int) -> None:
        self._limiter._charge(self.key_id, tokens)

    def release(self) -> None:
        with self._limiter._lock:
            if self._released:
                return
            self._released = True
        self._limiter._release(self.key_id)


class Limiter:
    def __init__(self, defaults: ServerConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.defaults, self.clock = defaults, clock
        self._lock = threading.Lock()
        self._usage: dict[str, _Usage] = {}

    def limits(self, key: KeyRecord) -> tuple[int, int, int]:
        """(rpm, tpm, max_live) of `key`, 0 meaning none."""
        d = self.defaults
        return _limit(key.rpm, d.key_rpm), _limit(key.tpm, d.key_tpm), _limit(key.max_live, d.key_max_live)

    def admit(self, key: KeyRecord) -> Lease | Refused:
        rpm, tpm, max_live = self.limits(key)
        with self._lock:
            now = self.clock()
            u = self._usage.setdefault(key.id, _Usage())
            while u.requests and u.requests[0] <= now - WINDOW:
                u.requests.popleft()
            while u.tokens and u.tokens[0][0] <= now - WINDOW:
                u.tokens.popleft()
            if refused := self._check(u, now, rpm, tpm, max_live):
                return refused
            u.requests.append(now)
            u.live += 1
        return Lease(self, key.id)

    @staticmethod
    def _check(u: _Usage, now: float, rpm: int, tpm: int, max_live: int) -> Refused | None:
        if max_live and u.live >= max_live:
            # A slot frees when a sequence ends, which no window predicts: a second is the honest guess.
            return Refused(f"This key already has {u.live} requests running, its limit; wait for one to finish.", 1,
                           "too_many_live_requests")
        if rpm and len(u.requests) >= rpm:
            wait = u.requests[len(u.requests) - rpm] + WINDOW - now
            return Refused(f"This key made {len(u.requests)} requests in the last minute, its limit of {rpm} per minute; "
                           f"retry in {_seconds(wait)} s.", _seconds(wait), "rate_limit_requests")
        used = sum(n for _, n in u.tokens)
        if tpm and used >= tpm:
            # The window admits again once enough of its oldest tokens age out to fall under tpm.
            over, wait = used - tpm, 0.0
            for at, n in u.tokens:
                over -= n
                wait = at + WINDOW - now
                if over < 0:
                    break
            return Refused(f"This key used {used} tokens in the last minute, its limit of {tpm} per minute; "
                           f"retry in {_seconds(wait)} s.", _seconds(wait), "rate_limit_tokens")
        return None

    def _charge(self, key_id: str, tokens: int) -> None:
        if tokens <= 0:
            return
        with self._lock:
            self._usage.setdefault(key_id, _Usage()).tokens.append((self.clock(), tokens))

    def _release(self, key_id: str) -> None:
        with self._lock:
            u = self._usage.get(key_id)
            if u is not None and u.live > 0:
                u.live -= 1
