"""Per-sequence sampling for the transformers engine, one row of logits at a time.

Like the llama.cpp chain: logit bias, presence/frequency penalties over the tokens this answer
generated, the grammar (an llguidance token mask), then top-p, temperature and a seeded draw, or
greedy. Log-probabilities are the model's own (before bias, penalties and grammar).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from appliance.engines.constraints import Constraint, check_matcher, lark
from appliance.engines.scheduler import Sequence, TokenLogprob


@dataclass
class RowState:
    generator: Any = None  # torch.Generator of a sampled sequence
    matcher: Any = None  # llguidance.LLMatcher of a constrained one
    mask: Any = None  # its token bitmask


class Sampler:
    def __init__(self, torch: Any, tokenizer: Any, device: str) -> None:
        self.torch, self.tokenizer, self.device = torch, tokenizer, device
        self._ll_tokenizer: Any = None

    def _ll(self) -> Any:
        if self._ll_tokenizer is None:
            import llguidance.hf

            self._ll_tokenizer = llguidance.hf.from_tokenizer(self.tokenizer)
        return self._ll_tokenizer

    def compile(self, c: Constraint) -> tuple[str, Constraint]:
        """The grammar SamplingParams.grammar carries for `c`; ConstraintError when it cannot be made."""
        import llguidance

        grammar = lark(c)
        check_matcher(llguidance.LLMatcher(self._ll(), grammar), c)
        return grammar, c

    def _state(self, s: Sequence) -> RowState:
        if s.state is None:
            import llguidance
            import llguidance.torch as lt

            p, st = s.params, RowState()
            if not p.greedy:
                st.generator = self.torch.Generator(device=self.device)
                st.generator.manual_seed(p.seed if p.seed is not None else int(self.torch.seed()))
            if p.grammar is not None:
                grammar, c = p.grammar
                st.matcher = check_matcher(llguidance.LLMatcher(self._ll(), grammar), c)
                st.mask = lt.allocate_token_bitmask(1, self._ll().vocab_size)
            s.state = st
        return s.state  # type: ignore[no-any-return]

    def pick(self, seqs: list[Sequence], logits: Any) -> list[int]:
        return [self._pick(s, row) for s, row in zip(seqs, logits.float(), strict=True)]

    def _pick(self, s: Sequence, row: Any) -> int:
        p = s.params
        if p.greedy and p.plain and p.logprobs is None:
            return int(row.argmax())
        st = self._state(s)
        raw = row
        if not p.plain:
            row = self._shape(s, st, row.clone())
        if p.greedy:
            tok = int(row.argmax())
        else:
            tok = self._draw(row, p.temperature, p.top_p, st.generator)
        if st.matcher is not None:
            st.matcher.consume_token(tok)
        if p.logprobs is not None:
            s.logprobs.append(token_logprob(self.torch, raw, tok, p.logprobs))
        return tok

    def _shape(self, s: Sequence, st: RowState, row: Any) -> Any:
        torch, p = self.torch, s.params
        if p.logit_bias:
            ids = torch.tensor([t for t, _ in p.logit_bias], device=row.device)
            row[ids] += torch.tensor([b for _, b in p.logit_bias], device=row.device, dtype=row.dtype)
        if (p.presence_penalty or p.frequency_penalty) and s.generated:
            counts = torch.bincount(torch.tensor(s.generated, device=row.device), minlength=row.shape[0])[: row.shape[0]]
            row -= counts.to(row.dtype) * p.frequency_penalty + (counts > 0).to(row.dtype) * p.presence_penalty
        if st.matcher is not None:
            import llguidance.torch as lt

            lt.fill_next_token_bitmask(st.matcher, st.mask, 0)
            row.masked_fill_(~self._allowed(st.mask[0], row.shape[0]).to(row.device), float("-inf"))
        return row

    def _allowed(self, words: Any, vocab: int) -> Any:
        """The bitmask (32 tokens an int32 word) as one bool a token. llguidance's own
        apply_token_bitmask_inplace runs torch.compile, which needs a compiler at the site and
        costs seconds on the first request: this is the same arithmetic, eager."""
        torch = self.torch
        bits = ((words.unsqueeze(1) >> torch.arange(32, dtype=torch.int32)) & 1).flatten().bool()
        allowed = torch.zeros(vocab, dtype=torch.bool)
        n = min(vocab, bits.numel())
        allowed[:n] = bits[:n]  # tokens past the mask (a padded embedding) are never allowed
        return allowed

    def _draw(self, row: Any, temperature: float, top_p: float, generator: Any) -> int:
        torch = self.torch
        probs = torch.softmax(row / temperature, dim=-1)
        if top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            cut = sorted_p.cumsum(0) - sorted_p > top_p
            sorted_p[cut] = 0
            probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
        return int(torch.multinomial(probs, 1, generator=generator))


def token_logprob(torch: Any, row: Any, tok: int, k: int) -> TokenLogprob:
    """log softmax of `row` at `tok`, and the `k` likeliest tokens, likeliest first."""
    lp = torch.log_softmax(row.double(), dim=-1)
    top: tuple[tuple[int, float], ...] = ()
    if k:
        vals, idx = lp.topk(k)
        top = tuple((int(i), float(v)) for i, v in zip(idx.tolist(), vals.tolist(), strict=True))
    return TokenLogprob(tok, float(lp[tok]), top)
