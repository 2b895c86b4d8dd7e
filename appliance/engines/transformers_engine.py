"""safetensors models through transformers (+ peft for LoRA), batched like the llama.cpp engine.

All live sequences share one left-padded batch and one KV cache, so each decode step is a single
forward pass. When a sequence leaves, its row is dropped from the cache. Newcomers' prompts are
prefilled in a second pass of their own, at most `chunk` tokens each a step (the scheduler plans the
chunks, so a long prompt never stalls the live answers for more than a chunk's work): a prompt not
all computed yet keeps its cells in a one-row cache of its own between steps, and the next chunk is
computed on top of them. Once its last token is computed the sequence gets its first token and its
row is appended to the batch (the shorter side left-padded), so a join never recomputes the others.

A finished sequence's cells (its row's keys and values) are saved in a store of recent prompts
(appliance.engines.prefix_cache, `[server] prefix_cache_mib` of memory on the model's device); a newcomer whose prompt starts like a saved one
(the same system prompt, a chat's earlier turns resent) gets those cells copied into its row, as it
does the template's system preamble (computed once, with and without the adapter), and its prefill
computes only the rest of the prompt (its first chunk starts after them); the padding then sits
between the reused (or already computed) cells and the rest, which the mask hides. Only finished
sequences' cells are saved, never a prompt's partial prefill. An adapter swap forgets every cell.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from appliance.engines.chat_template import ChatTemplate, shared_prefix
from appliance.engines.constraints import Constraint
from appliance.engines.prefix_cache import DEFAULT_PREFIX_CACHE_MIB, PrefixStore
from appliance.engines.sequences import Sequence
from appliance.engines.torch_sampling import Sampler
from appliance.errors import EngineError


class TransformersBackend:
    def __init__(self, model_path: Path, *, context_length: int, dtype: str = "float32", device: str | None = None,
                 threads: int | None = None, prefix_cache_mib: int = DEFAULT_PREFIX_CACHE_MIB) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        # Where the plan put it (appliance.engines.replicas), never a device chosen here: no GPU tier on the CPU.
        self.device = device or "cpu"
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise EngineError(f"The model is placed on {self.device}, but torch {torch.__version__} sees no CUDA device on this host, "
                              "so it will not start (it never falls back to the CPU).",
                              "Check the driver with `nvidia-smi`, or install the bundle's cpu tier (`appliance install DIR --tier cpu`).")
        if self.device == "cpu" and threads:
            # OpenMP threads beyond the cores that are really free spin against each other.
            torch.set_num_threads(threads)
        try:
            self.tok = AutoTokenizer.from_pretrained(model_path)
            model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype))
            self.base = model.to(self.device).eval()  # type: ignore[arg-type]
        except (OSError, ValueError) as e:
            raise EngineError(f"transformers could not load the model in {model_path}: {e}".rstrip(".") + ".") from None
        self.context_length = context_length
        self.peft: Any = None  # a PeftModel wrapping `base` once an adapter was loaded
        self.lora_name: str | None = None
        ends = self.base.generation_config.eos_token_id
        self.ends = {int(t) for t in (ends if isinstance(ends, list) else [ends]) if t is not None}
        if self.tok.eos_token_id is not None:
            self.ends.add(int(self.tok.eos_token_id))
        self.pad = int(self.tok.pad_token_id if self.tok.pad_token_id is not None else next(iter(self.ends), 0))
        self.template = ChatTemplate(self.tok.chat_template, self.tok.bos_token or "", self.tok.eos_token or "")
        self.sampler = Sampler(torch, self.tok, self.device)
        self.n_vocab = int(self.base.config.vocab_size)
        self.prefix = shared_prefix(self.tokenize, self.render_chat)
        self._prefix_kv: dict[bool, list[tuple[Any, Any]]] = {}  # adapter on? -> each layer's (keys, values)
        self.saved = PrefixStore(prefix_cache_mib << 20)  # finished sequences' cells
        self.reused_tokens = 0  # prompt tokens taken from saved cells instead of being prefilled
        self.rows: list[Sequence] = []  # the batch's rows, in cache order
        self.partial: dict[Sequence, tuple[Any, int]] = {}  # mid-prefill -> (its cells per layer, how many)
        self.cache: Any = None
        self.mask: Any = None

    # --- Backend --------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        return self.template.render(messages)

    def detokenize(self, tokens: list[int]) -> str:
        return str(self.tok.decode(tokens, skip_special_tokens=True))

    def is_end(self, token: int) -> bool:
        return token in self.ends

    def prefill_budget(self) -> int:
        return self.context_length * 8

    def release(self, seq: Sequence) -> None:
        """Save a decoding row's cells for a later prompt that starts the same way (the row leaves the cache at the
        next step); a partial prefill's cells are only dropped."""
        seq.state = None
        self.partial.pop(seq, None)
        row = next((i for i, s in enumerate(self.rows) if s is seq), None)
        if row is None or self.cache is None or not self.saved.max_bytes:
            return
        kv = self._cells(self.cache, self.mask, row)
        n = kv[0][0].shape[2]
        tokens = (seq.prompt + seq.generated)[:n]
        if len(tokens) == n:
            self.saved.put(tokens, self._wants([seq])[0], kv, sum(k.nbytes + v.nbytes for k, v in kv))

    def _cells(self, cache: Any, mask: Any, row: int) -> list[tuple[Any, Any]]:
        """One row's cells per layer (keys, values), in position order: padding is all the mask hides."""
        cells = mask[row].nonzero().squeeze(1)
        return [(layer.keys[row:row + 1, :, cells], layer.values[row:row + 1, :, cells]) for layer in cache.layers]

    def _wants(self, seqs: list[Sequence]) -> list[bool]:
        """Per row: does it run with the adapter?"""
        return [self.lora_name is not None and s.params.use_adapter for s in seqs]

    def _forward(self, seqs: list[Sequence], **kw: Any) -> Any:
        """One forward pass; rows that asked for the base model skip the adapter (peft's mixed batches)."""
        return self._forward_rows(self._wants(seqs), **kw)

    def _forward_rows(self, wants: list[bool], **kw: Any) -> Any:
        if self.peft is None:
            return self.base(**kw)
        if not any(wants):
            with self.peft.disable_adapter():
                return self.peft(**kw)
        if all(wants):
            return self.peft(**kw)
        return self.peft(**kw, adapter_names=[self.lora_name if w else "__base__" for w in wants])

    def claim(self, seq: Sequence, free: list[int]) -> int:
        return free[-1]  # its cache rows live in the batch, not in a slot

    def step(self, admit: list[Sequence], live: list[Sequence]) -> list[int | None]:
        """Every sequence's next token, `live` first, then `admit`: None for one whose prompt is not all in the cache yet.

        Each sequence in `admit` computes at most `chunk` more prompt tokens (after the cached start of its
        prompt, looked up at its first step; `chunk` is then set to the tokens really computed, which the
        scheduler's step cost counts) and `prefilled` follows.
        """
        try:
            return self._step(admit, live)
        except BaseException:
            self._forget()  # half-updated: nothing in it may be saved or reused
            raise

    def _forget(self) -> None:
        self.rows, self.cache, self.mask = [], None, None
        self.partial.clear()

    def _step(self, admit: list[Sequence], live: list[Sequence]) -> list[int | None]:
        torch = self.torch
        stale = [] if self.rows else live  # nothing cached for them (e.g. after a failed step): prefilled again, whole
        picks: dict[int, int] = {}
        with torch.inference_mode():
            if live and self.rows:
                self._keep(live)
                ids = torch.tensor([[s.generated[-1]] for s in self.rows], device=self.device)
                self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
                pos = self.mask.sum(dim=1, keepdim=True) - 1
                out = self._forward(self.rows, input_ids=ids, attention_mask=self.mask, position_ids=pos,
                                    past_key_values=self.cache, use_cache=True)
                self.cache = out.past_key_values
                picks.update(zip(map(id, self.rows), self._sample(self.rows, out.logits[:, -1, :]), strict=True))
            picks.update(self._prefill_chunks(admit, stale))
        return [picks.get(id(s)) for s in [*live, *admit]]

    def _prefill_chunks(self, admit: list[Sequence], stale: list[Sequence]) -> dict[int, int]:
        """The next chunk of each prompt in `admit` (and all of `stale`) in one pass; the first token of each
        sequence whose prompt is now all in the cache, and its row joins the batch."""
        work = [(s, self._reused(s, s.prompt + s.generated), s.prompt + s.generated) for s in stale]
        for s in admit:
            if s not in self.partial:  # its first step: start after the longest cached start of its prompt
                self.partial[s] = self._reused(s, s.prompt)
                s.prefilled = self.partial[s][1]
            end = min(len(s.prompt), s.prefilled + s.chunk)
            s.chunk = end - s.prefilled
            if s.chunk:
                work.append((s, self.partial[s], s.prompt[:end]))
        if not work:
            return {}
        seqs = [s for s, _, _ in work]
        cache, mask, logits = self._prefill(seqs, [start for _, start, _ in work], [text for _, _, text in work])
        done = []
        for i, (s, _, text) in enumerate(work):
            s.prefilled = min(len(text), len(s.prompt))
            if len(text) < len(s.prompt):  # more to come: its cells wait for the next chunk
                self.partial[s] = (self._cells(cache, mask, i), len(text))
            else:
                self.partial.pop(s, None)
                done.append(i)
        if not done:
            return {}
        if len(done) < len(work):
            mask = self._select(cache, mask, done)
        joined = [seqs[i] for i in done]
        self._merge(joined, cache, mask)
        return dict(zip(map(id, joined), self._sample(joined, logits[done]), strict=True))

    def _reused(self, s: Sequence, text: list[int]) -> tuple[Any, int]:
        kv, n = self._reusable(text, self._wants([s])[0])
        self.reused_tokens += n
        return kv, n

    def _keep(self, live: list[Sequence]) -> None:
        """Drop the cache rows of sequences that left (finished or cancelled)."""
        wanted = {id(s) for s in live}
        keep = [i for i, s in enumerate(self.rows) if id(s) in wanted]
        if len(keep) != len(self.rows):
            self.mask = self._select(self.cache, self.mask, keep)
            self.rows = [self.rows[i] for i in keep]

    def _select(self, cache: Any, mask: Any, rows: list[int]) -> Any:
        """Keep only `rows` of `cache` (in place) and the columns where one of them has a cell; their mask."""
        cache.batch_select_indices(self.torch.tensor(rows, device=self.device))
        mask = mask[rows]
        used = mask.any(dim=0).nonzero()
        first = int(used[0]) if len(used) else 0  # columns before it are padding in every row left
        if first:
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
        return mask[:, first:]

    def _prefill(self, seqs: list[Sequence], reused: list[tuple[Any, int]], texts: list[list[int]]) -> tuple[Any, Any, Any]:
        """One forward pass over each text after its first n tokens' cells (`reused`: (cells, n)), left-padded:
        (cache, mask, last logits)."""
        from transformers import DynamicCache

        torch = self.torch
        k = max(n for _, n in reused)
        rests = [t[n:] for t, (_, n) in zip(texts, reused, strict=True)]
        width = max(len(t) for t in rests)
        ids = torch.full((len(seqs), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), k + width), dtype=torch.long)
        for i, (t, (_, n)) in enumerate(zip(rests, reused, strict=True)):  # padded on the left: every row's next token is at the last column
            ids[i, width - len(t):] = torch.tensor(t)
            mask[i, k - n:k] = 1
            mask[i, k + width - len(t):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        cache = DynamicCache()
        if k:
            ref = next(kv for kv, n in reused if n)  # one row's cells: the shape every row's take, layer by layer
            for layer in range(len(ref)):
                cache.update(*(torch.cat([self._left_padded(kv, n, k, ref[layer][side], layer, side) for kv, n in reused])
                               for side in (0, 1)), layer)
        pos = (mask.cumsum(dim=1) - 1).clamp(min=0)[:, k:]
        # logits_to_keep=1: the vocabulary projection only for the last position, not every prompt token.
        out = self._forward(seqs, input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                            use_cache=True, logits_to_keep=1)
        return out.past_key_values, mask, out.logits[:, -1, :]

    def _reusable(self, text: list[int], adapter: bool) -> tuple[Any, int]:
        """The cells of the longest cached start of `text` (saved, or the template's preamble) and its
        length; (None, 0) when none. The last token is always computed: it gives the next one."""
        kv, n = self.saved.get(text[:-1], adapter)
        k = len(self.prefix)
        if k > n and len(text) > k and text[:k] == self.prefix:
            return self._prefix_cache(adapter), k
        return kv, n

    def _left_padded(self, kv: Any, n: int, k: int, like: Any, layer: int, side: int) -> Any:
        """The first `n` cells of one row's `kv[layer][side]` (keys 0, values 1), after k - n zeros."""
        pad = like.new_zeros((1, like.shape[1], k - n, like.shape[3]))
        return pad if not n else self.torch.cat([pad, kv[layer][side][:, :, :n]], dim=2)

    def _prefix_cache(self, adapter: bool) -> list[tuple[Any, Any]]:
        """The shared prefix's keys and values per layer (one row), computed on first use."""
        kv = self._prefix_kv.get(adapter)
        if kv is None:
            from transformers import DynamicCache

            ids = self.torch.tensor([self.prefix], device=self.device)
            out = self._forward_rows([adapter], input_ids=ids, past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)
            kv = self._prefix_kv[adapter] = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        return kv

    def _merge(self, seqs: list[Sequence], cache: Any, mask: Any) -> None:
        """Append newcomers' cache rows to the batch, left-padding whichever side is shorter."""
        if not self.rows:
            self.cache, self.mask, self.rows = cache, mask, list(seqs)
            return
        torch = self.torch

        def pad(x: Any, n: int, dim: int) -> Any:
            if n == 0:
                return x
            shape = list(x.shape)
            shape[dim] = n
            return torch.cat([x.new_zeros(shape), x], dim=dim)

        old_t, new_t = self.mask.shape[1], mask.shape[1]
        width = max(old_t, new_t)
        for old, new in zip(self.cache.layers, cache.layers, strict=True):
            old.keys = torch.cat([pad(old.keys, width - old_t, 2), pad(new.keys, width - new_t, 2)], dim=0)
            old.values = torch.cat([pad(old.values, width - old_t, 2), pad(new.values, width - new_t, 2)], dim=0)
        self.mask = torch.cat([pad(self.mask, width - old_t, 1), pad(mask, width - new_t, 1)], dim=0)
        self.rows = [*self.rows, *seqs]

    def _sample(self, seqs: list[Sequence], logits: Any) -> list[int]:
        return self.sampler.pick(seqs, logits)

    def compile_constraint(self, c: Constraint) -> Any:
        """The grammar SamplingParams.grammar carries for `c`; ConstraintError when it cannot be made."""
        return self.sampler.compile(c)

    def apply_adapter(self, adapter: Any) -> None:
        """Load `adapter.peft_dir` (PEFT safetensors) beside the base weights; None returns to the base model.

        The new adapter is loaded before the old one is dropped, so a failed load leaves the
        previous one in place.
        """
        self._forget()
        self._prefix_kv.clear()  # computed with the weights that are about to change
        self.saved.clear()
        if adapter is None:
            self.lora_name = None
            return
        from peft import PeftModel

        name = "a_" + re.sub(r"\W", "_", adapter.id)
        try:
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(self.base, adapter.peft_dir, adapter_name=name).eval()
            else:
                if name not in self.peft.peft_config:
                    self.peft.load_adapter(adapter.peft_dir, adapter_name=name)
                self.peft.set_adapter(name)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise EngineError(f"peft could not load the adapter {adapter.id} from {adapter.peft_dir}: {e}") from None
        self.lora_name = name
        for old in [n for n in self.peft.peft_config if n != name]:
            self.peft.delete_adapter(old)

    def close(self) -> None:
        self._forget()
