"""Which cached prompt prefix a new prompt can start from: the longest match wins, the least recently used goes first.

A pure index, no KV tensors: each entry says which tokens (positions 0..n-1) a holder of KV cells
contains (a llama.cpp sequence slot, a saved transformers cache) and under which weights they were
computed (`tag`: the adapter; cells computed with one LoRA are wrong for another). The backends
keep the cells; this decides which to reuse and which to give up.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field

from appliance.config import ServerConfig

DEFAULT_PREFIX_CACHE_MIB = ServerConfig.prefix_cache_mib


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class Entry:
    tokens: list[int] = field(default_factory=list)
    tag: Hashable = None
    used: int = 0  # the index's clock when the entry was last written or reused


class PrefixIndex:
    """What each holder's KV cells contain, keyed by the holder (an int: a slot)."""

    def __init__(self) -> None:
        self.entries: dict[int, Entry] = {}
        self._clock = 0

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def set(self, key: int, tokens: Sequence[int], tag: Hashable) -> None:
        self.entries[key] = Entry(list(tokens), tag, self._tick())

    def extend(self, key: int, tokens: Iterable[int]) -> None:
        entry = self.entries.setdefault(key, Entry(used=self._tick()))
        entry.tokens.extend(tokens)

    def tokens(self, key: int) -> list[int]:
        entry = self.entries.get(key)
        return entry.tokens if entry else []

    def touch(self, key: int) -> None:
        if key in self.entries:
            self.entries[key].used = self._tick()

    def drop(self, key: int) -> None:
        self.entries.pop(key, None)

    def clear(self) -> None:
        self.entries.clear()

    def best(self, tokens: Sequence[int], tag: Hashable, keys: Iterable[int]) -> tuple[int | None, int]:
        """(the holder among `keys` sharing the longest prefix with `tokens` under `tag`, its length); (None, 0) when none."""
        found, length = None, 0
        for key in keys:
            entry = self.entries.get(key)
            if entry is None or entry.tag != tag:
                continue
            n = common_prefix(tokens, entry.tokens)
            if n > length:
                found, length = key, n
        return found, length

    def oldest(self, keys: Iterable[int]) -> int:
        """The least recently used of `keys` (one that holds nothing counts as oldest)."""
        return min(keys, key=lambda k: self.entries[k].used if k in self.entries else -1)


class PrefixStore:
    """Saved KV cells of recent prompts (any payload: per-layer tensors, a llama.cpp sequence's state),
    `max_bytes` in all.

    A new entry replaces any entry it extends (a chat's previous turn); beyond the bound the least
    recently used go first.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.index = PrefixIndex()
        self.payloads: dict[int, tuple[object, int]] = {}  # key -> (payload, its size in bytes)
        self._next = 0

    @property
    def nbytes(self) -> int:
        return sum(n for _, n in self.payloads.values())

    def covers(self, tokens: Sequence[int], tag: Hashable) -> bool:
        """Does an entry under `tag` hold all of `tokens` (and perhaps more)?"""
        return any(e.tag == tag and common_prefix(e.tokens, tokens) == len(tokens) for e in self.index.entries.values())

    def put(self, tokens: Sequence[int], tag: Hashable, payload: object, nbytes: int) -> None:
        if not tokens or nbytes > self.max_bytes:
            return
        for key, e in list(self.index.entries.items()):
            if e.tag == tag and common_prefix(e.tokens, tokens) == len(e.tokens):
                self._drop(key)
        while self.nbytes + nbytes > self.max_bytes:
            self._drop(self.index.oldest(self.payloads))
        self._next += 1
        self.index.set(self._next, tokens, tag)
        self.payloads[self._next] = (payload, nbytes)

    def get(self, tokens: Sequence[int], tag: Hashable) -> tuple[object, int]:
        """(the payload sharing the longest prefix with `tokens` under `tag`, that length); (None, 0) when none."""
        key, n = self.index.best(tokens, tag, list(self.payloads))
        if key is None:
            return None, 0
        self.index.touch(key)
        return self.payloads[key][0], n

    def _drop(self, key: int) -> None:
        self.index.drop(key)
        self.payloads.pop(key, None)

    def clear(self) -> None:
        self.index.clear()
        self.payloads.clear()
