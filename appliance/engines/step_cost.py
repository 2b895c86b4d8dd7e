"""How long a decode step takes, measured as the engine runs, and so how much prompt a step may prefill.

A step decodes one token of every live sequence and, beside them, a chunk of the prompts being
prefilled. Its time is about `decode + per_token * chunk`: `decode` is learnt from steps without
prefill, `per_token` from the others (the decode part taken off). While answers stream, the chunk
is sized so that the prefill takes at most `share` of the step: their next token then comes at most
1 / (1 - share) times later than without it (0.5: twice). With nothing live, a step prefills
`prefill_chunk` tokens whatever it costs: no one is waiting for a token. A short prompt (at most
SHORT_PROMPT tokens left) goes whole in one step either way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MIN_CHUNK = 1  # prompt tokens a step prefills at least, so a long prompt always moves on
# A prompt with at most this many tokens left is prefilled in one step even beside streaming answers:
# a chat turn's or a short question's first token is worth one longer gap in the streams (a step costs
# about as much as a second decode pass whatever its size, so a few tokens a step would double the gap
# many times over instead of lengthening it once).
SHORT_PROMPT = 64
WEIGHT = 0.2  # of each new measurement in the running averages


@dataclass
class StepCost:
    decode: dict[int, float] = field(default_factory=dict)  # live sequences -> seconds of a step without prefill (running average)
    per_token: float | None = None  # seconds per prefilled prompt token (running average)

    def decode_time(self, live: int) -> float | None:
        """A step's time for `live` sequences alone: measured at that count, else at the nearest one measured."""
        if not self.decode:
            return None
        return self.decode[min(self.decode, key=lambda n: (abs(n - live), n))]

    def observe(self, live: int, prefilled: int, seconds: float) -> None:
        """One step's time: `live` sequences decoded a token each, `prefilled` prompt tokens computed."""
        if prefilled <= 0:
            if live > 0:
                self.decode[live] = _average(self.decode.get(live), seconds)
            return
        spent = seconds - ((self.decode_time(live) or 0.0) if live > 0 else 0.0)
        if spent > 0:
            self.per_token = _average(self.per_token, spent / prefilled)

    def chunk(self, live: int, share: float, most: int) -> int:
        """Prompt tokens the next step may prefill beside `live` decoding sequences (at most `most`)."""
        decode = self.decode_time(live)
        if live == 0 or share >= 1.0 or decode is None or self.per_token is None:
            return most
        allowed = share / (1.0 - share) * decode / self.per_token
        return max(MIN_CHUNK, min(most, int(allowed + 1e-6)))


def _average(old: float | None, new: float) -> float:
    return new if old is None else (1.0 - WEIGHT) * old + WEIGHT * new
