"""Exact and near-duplicate removal (MinHash over word shingles with LSH banding).

Within one run and against every earlier run: the index of what was seen is a value the caller
loads before and saves after the run, so a killed run never records examples it did not train on.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

import numpy as np

from appliance.trainer.data import Example

NUM_PERM = 128
BANDS = 32  # 32 bands of 4 rows: pairs above ~0.5 Jaccard almost always share a band
# Universal hashing (a*x + b) mod p with 32-bit x, a, b and a prime just above 2**32: the product
# fits in 64 bits and wraps modulo p billions of times, so the order of hashes is well mixed.
_PRIME = 4294967311
_rng = np.random.default_rng(20261122)
_A = _rng.integers(1, 1 << 32, NUM_PERM, dtype=np.uint64)
_B = _rng.integers(0, 1 << 32, NUM_PERM, dtype=np.uint64)


def normalize(ex: Example) -> str:
    """What counts for sameness: user and assistant text, case and spacing folded (a shared system prompt does not)."""
    text = " ".join(f"{r}: {c}" for r, c in ex.messages if r != "system")
    return re.sub(r"\s+", " ", text.lower()).strip()


def exact_key(ex: Example) -> str:
    return hashlib.sha256(normalize(ex).encode()).hexdigest()


def shingles(text: str, k: int = 3) -> set[str]:
    words = re.findall(r"\w+|[^\w\s]", text)
    if len(words) < k:
        return {" ".join(words)}
    return {" ".join(words[i : i + k]) for i in range(len(words) - k + 1)}


def signature(text: str) -> np.ndarray:
    """MinHash signature: per permutation, the least (a*h + b) mod p over the shingle hashes."""
    hs = np.array([int.from_bytes(hashlib.blake2b(s.encode(), digest_size=4).digest(), "little") for s in shingles(text)],
                  dtype=np.uint64)
    h = hs[:, None] * _A[None, :] + _B[None, :]
    return (h % np.uint64(_PRIME)).min(axis=0)


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Estimated Jaccard similarity of the two shingle sets."""
    return float(np.mean(a == b))


@dataclass
class SeenIndex:
    """What earlier runs trained or validated on: exact keys and MinHash signatures."""

    exact: set[str] = field(default_factory=set)
    signatures: list[np.ndarray] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"exact": sorted(self.exact), "minhash": [s.tolist() for s in self.signatures]}

    @classmethod
    def from_json(cls, d: dict) -> SeenIndex:
        return cls(set(d.get("exact", [])), [np.array(s, dtype=np.uint64) for s in d.get("minhash", [])])


@dataclass
class Deduped:
    examples: list[Example]
    exact_dupes: int
    near_dupes: int
    seen_before: int
    new_index: SeenIndex  # the input index plus this run's kept examples


def _bands(sig: np.ndarray) -> list[tuple[int, bytes]]:
    rows = NUM_PERM // BANDS
    return [(b, sig[b * rows : (b + 1) * rows].tobytes()) for b in range(BANDS)]


def dedupe(examples: list[Example], seen: SeenIndex, threshold: float) -> Deduped:
    """Drop exact and near duplicates; the first occurrence in the run is kept."""
    buckets: dict[tuple[int, bytes], list[int]] = {}
    sigs: list[np.ndarray] = []
    n_old = len(seen.signatures)
    for i, s in enumerate(seen.signatures):
        sigs.append(s)
        for band in _bands(s):
            buckets.setdefault(band, []).append(i)
    exact = set(seen.exact)
    kept: list[Example] = []
    counts = {"exact": 0, "near": 0, "seen": 0}
    for ex in examples:
        key = exact_key(ex)
        if key in exact:
            counts["seen" if key in seen.exact else "exact"] += 1
            continue
        sig = signature(normalize(ex))
        candidates = {j for band in _bands(sig) for j in buckets.get(band, [])}
        match = next((j for j in sorted(candidates) if similarity(sig, sigs[j]) >= threshold), None)
        if match is not None:
            counts["seen" if match < n_old else "near"] += 1
            continue
        exact.add(key)
        idx = len(sigs)
        sigs.append(sig)
        for band in _bands(sig):
            buckets.setdefault(band, []).append(idx)
        kept.append(ex)
    return Deduped(kept, counts["exact"], counts["near"], counts["seen"], SeenIndex(exact, sigs))
