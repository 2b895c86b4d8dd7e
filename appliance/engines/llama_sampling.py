"""Per-sequence sampling for the llama.cpp engine: one sampler chain per sequence.

The chain is logit bias, then presence/frequency penalties (over the tokens this answer generated),
then the grammar (structured output), then top-p, temperature and a seeded draw, or greedy. A
greedy sequence with none of those needs no chain: an argmax over the logits. Log-probabilities are
the model's own (before bias, penalties and grammar), read from the same logits row.
"""

from __future__ import annotations

import random
from typing import Any

from appliance.engines.constraints import Constraint, ConstraintError, gbnf
from appliance.engines.scheduler import SamplingParams, Sequence, TokenLogprob


def compile_constraint(L: Any, vocab: Any, c: Constraint) -> tuple[str, str]:
    """(grammar, root) that llama.cpp's grammar sampler accepts, or a ConstraintError."""
    text, root = gbnf(c)
    probe = L.llama_sampler_init_grammar(vocab, text.encode(), root.encode())
    if not probe:
        raise ConstraintError(f"The JSON schema in {c.param} makes a grammar llama.cpp refuses; simplify the schema.", c.param)
    L.llama_sampler_free(probe)
    return text, root


def make_chain(L: Any, vocab: Any, n_vocab: int, p: SamplingParams, window: int) -> Any:
    """The sampler chain for `p`, or None where an argmax does the same."""
    if p.greedy and p.plain:
        return None
    chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
    if p.logit_bias:
        arr = (L.llama_logit_bias * len(p.logit_bias))()
        for i, (tok, bias) in enumerate(p.logit_bias):
            arr[i].token, arr[i].bias = tok, bias
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_logit_bias(n_vocab, len(p.logit_bias), arr))
    if p.presence_penalty or p.frequency_penalty:
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_penalties(n_vocab, window, 1.0, p.frequency_penalty, p.presence_penalty))
    if p.grammar is not None:
        text, root = p.grammar
        grammar = L.llama_sampler_init_grammar(vocab, text.encode(), root.encode())
        if not grammar:
            L.llama_sampler_free(chain)
            raise ConstraintError("llama.cpp refused the grammar.", "response_format")
        L.llama_sampler_chain_add(chain, grammar)
    if p.greedy:
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_greedy())
    else:
        if p.top_p < 1.0:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_p(p.top_p, 1))
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_temp(p.temperature))
        seed = p.seed if p.seed is not None else random.getrandbits(32)
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_dist(seed & 0xFFFFFFFF))
    return chain


def pick(L: Any, ctx: Any, n_vocab: int, s: Sequence, row: int) -> int:
    """The next token of `s` from batch row `row` (recording its log-probability when asked)."""
    import numpy as np

    logits = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, row), shape=(n_vocab,))
    # llama_sampler_sample copies the logits it works on, so `logits` still holds the model's own.
    tok = int(logits.argmax()) if s.state is None else int(L.llama_sampler_sample(s.state, ctx, row))
    if s.params.logprobs is not None:
        s.logprobs.append(token_logprob(logits, tok, s.params.logprobs))
    return tok


def token_logprob(logits: Any, tok: int, k: int) -> TokenLogprob:
    """log softmax of `logits` at `tok`, and the `k` likeliest tokens, likeliest first."""
    import numpy as np

    x = logits.astype(np.float64)
    m = x.max()
    lse = m + np.log(np.exp(x - m).sum())
    top: tuple[tuple[int, float], ...] = ()
    if k:
        idx = np.argpartition(-x, k)[:k]
        idx = idx[np.argsort(-x[idx], kind="stable")]
        top = tuple((int(i), float(x[i] - lse)) for i in idx)
    return TokenLogprob(tok, float(x[tok] - lse), top)


def free(L: Any, chain: Any) -> None:
    if chain is not None:
        L.llama_sampler_free(chain)

