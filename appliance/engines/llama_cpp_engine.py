"""GGUF models through llama.cpp's batch API (llama-cpp-python's low-level bindings).

The high-level `Llama` object decodes one sequence at a time. Here every live sequence has its
own KV-cache sequence id (its slot) and its own sampler chain, and one `llama_decode` call per step
carries the newcomers' whole prompts plus one token for each live sequence.

A finished sequence's cells stay in its slot (appliance.engines.prefix_cache indexes what each slot
holds). A newcomer gets the free slot whose cells share the longest prefix with its prompt (the same
system prompt, the previous turns of a chat resent as history) and keeps those cells; when a busy
slot shares more, its cells are copied over (llama_memory_seq_cp; across KV streams only whole
streams copy, so the tail is then removed). The template's system preamble, which every chat prompt
starts with, is decoded once into a spare sequence and serves as such a source too. The newcomer
then prefills only the rest, in chunks the scheduler plans; newcomers that arrive together with one
long system prompt wait while the first of them prefills it, and then copy its cells (`adopt`).

When a slot's cells are about to go (another prompt takes the slot, or keeps only its start), the
sequence's state is first saved to host memory (llama_state_seq_get_data, `[server] prefix_cache_mib`
in all, least recently used first); a later prompt that starts like a saved one more than like any
slot gets that state put back into its slot (llama_state_seq_set_data) and prefills only the rest:
more chats than slots keep their earlier turns. Cells computed with one adapter are reused only
under that adapter; an adapter swap forgets them all, saved ones too.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

from appliance.engines import llama_sampling
from appliance.engines.chat_template import ChatTemplate, shared_prefix
from appliance.engines.constraints import Constraint
from appliance.engines.prefix_cache import DEFAULT_PREFIX_CACHE_MIB, PrefixIndex, PrefixStore
from appliance.engines.sequences import Sequence
from appliance.errors import EngineError

HOST_CACHE_MIN = 64  # tokens: fewer are sooner prefilled again than saved to host memory and put back


def flash_attn_type(L: Any, setting: str) -> int:
    """llama.cpp's flash_attn_type for [model] flash_attn (auto: llama.cpp's own choice, on wherever the
    device runs it, the CPU included)."""
    return {"on": L.LLAMA_FLASH_ATTN_TYPE_ENABLED, "off": L.LLAMA_FLASH_ATTN_TYPE_DISABLED}.get(setting, L.LLAMA_FLASH_ATTN_TYPE_AUTO)


class LlamaCppBackend:
    def __init__(self, model_path: Path, *, context_length: int, max_batch: int, threads: int, gpu_layers: int = 0,
                 ubatch: int = 512, prefix_cache_mib: int = DEFAULT_PREFIX_CACHE_MIB, flash_attn: str = "auto") -> None:
        from appliance.engines import cpu_backend

        self.cpu_variant = cpu_backend.load()  # before llama_backend_init, which would search elsewhere
        import llama_cpp as L
        from llama_cpp import _logger

        _logger.set_verbose(False)  # llama.cpp prints every tensor it loads otherwise
        self.L = L
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = 999 if gpu_layers < 0 else gpu_layers
        self.model = L.llama_model_load_from_file(str(model_path).encode(), mp)
        if not self.model:
            raise EngineError(f"llama.cpp could not load the model {model_path}.", "Check that the file is a complete GGUF model.")
        self.vocab = L.llama_model_get_vocab(self.model)
        cp = L.llama_context_default_params()
        # One KV stream per sequence, each `context_length` long, plus one for the shared prefix; a
        # batch holds one whole prompt plus one token for every other live sequence.
        self.n_batch = context_length + max_batch
        self.context_length = context_length
        self.prefix_seq, self.base_prefix_seq = max_batch, max_batch + 1
        cp.n_ctx = context_length * (max_batch + 2)
        cp.n_batch = self.n_batch
        cp.n_ubatch = min(ubatch, self.n_batch)  # tokens computed at once (llama.cpp's own default: 512)
        cp.n_seq_max = max_batch + 2
        cp.n_threads = cp.n_threads_batch = threads
        cp.kv_unified = False
        cp.flash_attn_type = flash_attn_type(L, flash_attn)
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            L.llama_model_free(self.model)
            raise EngineError(f"llama.cpp could not make a context of {cp.n_ctx} tokens for {model_path}.",
                              "Lower [model] context_length or [server] max_batch.")
        self.batch = L.llama_batch_init(self.n_batch, 0, 1)
        self._pieces: dict[int, bytes] = {}
        self._lora: Any = None
        self._lora_on = False
        self.add_bos = bool(L.llama_vocab_get_add_bos(self.vocab))
        self.template = ChatTemplate(self._meta("tokenizer.chat_template"),
                                     self._piece(L.llama_vocab_bos(self.vocab), True).decode(errors="replace"),
                                     self._piece(L.llama_vocab_eos(self.vocab), True).decode(errors="replace"))
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.prefix: list[int] = []
        self.index = PrefixIndex()  # what each slot's (and spare sequence's) cells hold
        self.reused_tokens = 0  # prompt tokens taken from cached cells instead of being prefilled
        self.saved = PrefixStore(prefix_cache_mib << 20)  # states of evicted slots: (buffer, tokens)
        self.restored_tokens = 0  # prompt tokens put back from host memory (also counted in reused_tokens)
        self._copied: set[int] = set()  # slots a stream copy fills at the next decode: their data is not there yet
        # Decoded at the first step, on the engine's thread, like every other llama_decode. libgomp
        # lets its idle workers spin only while it manages no more threads than there are cores; one
        # decode from a second thread adds a second team, after which workers sleep between the
        # barriers of every step and decoding ran about 2.5x slower here (bench/RESULTS.md).
        self._prefix_due = True

    def _fill_prefix(self) -> None:
        """Decode the tokens every chat prompt starts with into the spare sequences (with and,
        while an adapter is loaded, without it: a sequence's cache must come from one set of weights)."""
        L = self.L
        self._prefix_due = False
        mem = L.llama_get_memory(self.ctx)
        self.prefix = shared_prefix(self.tokenize, self.render_chat)
        n = len(self.prefix)
        bt = self.batch
        for seq, on in ((self.prefix_seq, True), (self.base_prefix_seq, False)):
            L.llama_memory_seq_rm(mem, seq, -1, -1)
            self.index.drop(seq)
            if not self.prefix or (not on and self._lora is None):
                continue
            self._use_lora(on)
            for i, t in enumerate(self.prefix):
                bt.token[i], bt.pos[i], bt.n_seq_id[i], bt.logits[i] = t, i, 1, False
                bt.seq_id[i][0] = seq
            bt.n_tokens = n
            if L.llama_decode(self.ctx, bt) != 0:
                self.prefix = []
            else:
                self.index.set(seq, self.prefix, on and self._lora is not None)

    def _use_lora(self, on: bool) -> None:
        """Apply the loaded adapter to the next decode call, or not (llama.cpp applies it per call)."""
        on = on and self._lora is not None
        if on == self._lora_on:
            return
        L = self.L
        if on:
            rc = L.llama_set_adapters_lora(self.ctx, (L.llama_adapter_lora_p_ctypes * 1)(self._lora), 1, (ctypes.c_float * 1)(1.0))
            if rc != 0:
                raise EngineError(f"llama.cpp refused the LoRA adapter (code {rc}).")
        else:
            L.llama_set_adapters_lora(self.ctx, None, 0, None)
        self._lora_on = on

    def _meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(65536)
        n = self.L.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode(errors="replace") if n >= 0 else None

    def _piece(self, token: int, special: bool = False) -> bytes:
        buf = ctypes.create_string_buffer(256)
        n = self.L.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n] if n > 0 else b""

    # --- Backend --------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        data = text.encode()
        cap = len(data) + 16
        arr = (self.L.llama_token * cap)()
        # parse_special: the chat template's markers (<|im_start|>) must become their tokens.
        n = self.L.llama_tokenize(self.vocab, data, len(data), arr, cap, self.add_bos, True)
        if n < 0:
            cap = -n
            arr = (self.L.llama_token * cap)()
            n = self.L.llama_tokenize(self.vocab, data, len(data), arr, cap, self.add_bos, True)
        return list(arr[:n])

    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        return self.template.render(messages)

    def detokenize(self, tokens: list[int]) -> str:
        pieces = self._pieces
        out = []
        for t in tokens:
            p = pieces.get(t)
            if p is None:
                p = pieces[t] = self._piece(t)
            out.append(p)
        return b"".join(out).decode("utf-8", errors="replace")

    def is_end(self, token: int) -> bool:
        return bool(self.L.llama_vocab_is_eog(self.vocab, token))

    def prefill_budget(self) -> int:
        return self.n_batch

    def compile_constraint(self, c: Constraint) -> tuple[str, str]:
        """The grammar SamplingParams.grammar carries for `c`; ConstraintError when it cannot be made."""
        return llama_sampling.compile_constraint(self.L, self.vocab, c)

    def claim(self, seq: Sequence, free: list[int]) -> int:
        """The free slot for `seq`, holding the longest cached prefix of its prompt there; sets `seq.prefilled`."""
        on = self._lora is not None and seq.params.use_adapter
        spares = [] if self._prefix_due or not self.prefix else [self.prefix_seq, self.base_prefix_seq]
        # The last prompt token is always decoded: its logits give the first answer token.
        src, n = self.index.best(seq.prompt[:-1], on, [*range(self.prefix_seq), *spares])
        saved, m = self.saved.get(seq.prompt[:-1], on)
        mem = self.L.llama_get_memory(self.ctx)
        if src in free and m < n + HOST_CACHE_MIN:
            slot = src
        else:
            slot = self.index.oldest(free)
            self._save(slot, 0)
            if m >= n + HOST_CACHE_MIN and self._restore(slot, saved, on):
                n = m
                self.restored_tokens += m
            elif src == slot:  # it did not restore, and what the slot held is gone
                n = 0
            elif src is not None:
                self.L.llama_memory_seq_cp(mem, src, slot, -1, -1)  # a whole stream; the tail goes next
                self._copied.add(slot)
        self._save(slot, n)
        self.L.llama_memory_seq_rm(mem, slot, n, -1)
        self.index.set(slot, seq.prompt[:n], on)
        seq.prefilled = n
        self.reused_tokens += n
        return slot

    def _save(self, slot: int, keep: int) -> None:
        """Save `slot`'s state to host memory before its cells beyond the first `keep` go, when that many are worth it."""
        entry = self.index.entries.get(slot)
        if (entry is None or len(entry.tokens) - keep < HOST_CACHE_MIN or slot in self._copied or not self.saved.max_bytes
                or self.saved.covers(entry.tokens, entry.tag)):
            return
        L = self.L
        size = L.llama_state_seq_get_size(self.ctx, slot)
        if size > self.saved.max_bytes:
            return
        buf = (ctypes.c_uint8 * size)()
        if L.llama_state_seq_get_data(self.ctx, buf, size, slot) == size:
            self.saved.put(entry.tokens, entry.tag, (buf, list(entry.tokens)), size)

    def _restore(self, slot: int, saved: Any, on: bool) -> bool:
        """Put a saved state back into `slot` (emptied first); False, the slot empty, when llama.cpp refuses it."""
        if slot in self._copied:  # the pending copy would overwrite it
            return False
        L = self.L
        buf, tokens = saved
        L.llama_memory_seq_rm(L.llama_get_memory(self.ctx), slot, -1, -1)
        self.index.drop(slot)
        if L.llama_state_seq_set_data(self.ctx, buf, len(buf), slot) == 0:
            L.llama_memory_seq_rm(L.llama_get_memory(self.ctx), slot, -1, -1)
            return False
        self.index.set(slot, tokens, on)
        return True

    def adopt(self, seq: Sequence, src: int, n: int) -> None:
        """Copy slot `src`'s first `n` cells (another sequence has just prefilled them) into `seq`'s slot."""
        mem = self.L.llama_get_memory(self.ctx)
        self.L.llama_memory_seq_cp(mem, src, seq.slot, -1, -1)  # a whole stream; the tail goes next
        self._copied.add(seq.slot)
        self.L.llama_memory_seq_rm(mem, seq.slot, n, -1)
        self.index.set(seq.slot, seq.prompt[:n], self._lora is not None and seq.params.use_adapter)
        self.reused_tokens += n - seq.prefilled
        seq.prefilled = n

    def step(self, admit: list[Sequence], live: list[Sequence]) -> list[int | None]:
        """Decode one step; return the next token of each sequence, `live` first, then `admit` (None for
        one whose prompt is not all decoded yet).

        Sequences that asked for the base model while an adapter is loaded go in a second decode
        call with the adapter off (llama.cpp applies adapters per context, not per sequence).
        """
        if self._prefix_due:
            self._fill_prefix()
        groups: dict[bool, tuple[list[Sequence], list[Sequence]]] = {}
        for s in live:
            groups.setdefault(self._lora is not None and s.params.use_adapter, ([], []))[0].append(s)
        for s in admit:
            groups.setdefault(self._lora is not None and s.params.use_adapter, ([], []))[1].append(s)
        picks: dict[int, int] = {}
        for on, (group_live, group_admit) in sorted(groups.items(), reverse=True):
            self._use_lora(on)
            picks.update(self._decode(group_admit, group_live))
        return [picks.get(id(s)) for s in [*live, *admit]]

    def _decode(self, admit: list[Sequence], live: list[Sequence]) -> dict[int, int]:
        """The live sequences' next tokens in one llama_decode, the prompt chunks in a second.

        With a KV stream per sequence llama.cpp splits a call into ubatches of consecutive sequence
        ids with as many tokens each: beside the live tokens a chunk would be cut differently from the
        same prompt decoded alone (and rounding differs with the cut), so it goes on its own.
        """
        picks = self._run([(s, s.generated[-1:], len(s.prompt) + len(s.generated) - 1, True) for s in live])
        work = []
        for s in admit:
            if s.state is None:
                s.state = llama_sampling.make_chain(self.L, self.vocab, self.n_vocab, s.params, self.context_length)
            end = min(len(s.prompt), s.prefilled + s.chunk)
            if end > s.prefilled:
                work.append((s, s.prompt[s.prefilled:end], s.prefilled, end == len(s.prompt)))
        picks.update(self._run(work))
        return picks

    def _run(self, work: list[tuple[Sequence, list[int], int, bool]]) -> dict[int, int]:
        """Decode each (sequence, tokens, position of the first, wants the next token) in one call; the
        picked tokens. Ordered by slot: a ubatch holds only a run of consecutive sequence ids."""
        if not work:
            return {}
        b, n, rows = self.batch, 0, []
        for s, toks, pos, want in sorted(work, key=lambda w: w[0].slot):
            for i, tok in enumerate(toks):
                b.token[n], b.pos[n], b.n_seq_id[n], b.logits[n] = tok, pos + i, 1, want and i == len(toks) - 1
                b.seq_id[n][0] = s.slot
                n += 1
            if want:
                rows.append((s, n - 1))
        b.n_tokens = n
        rc = self.L.llama_decode(self.ctx, b)
        if rc != 0:
            mem = self.L.llama_get_memory(self.ctx)
            for s, _, _, _ in work:  # what those cells hold is not known now
                self.L.llama_memory_seq_rm(mem, s.slot, -1, -1)
                self.index.drop(s.slot)
            raise EngineError(f"llama_decode returned {rc} for a batch of {n} tokens.")
        self._copied.clear()  # a decode makes the pending copies first
        for s, toks, pos, _ in work:
            self.index.extend(s.slot, toks)
            if pos < len(s.prompt):
                s.prefilled = pos + len(toks)
        return {id(s): self._pick(s, row) for s, row in rows}

    def _pick(self, s: Sequence, row: int) -> int:
        return llama_sampling.pick(self.L, self.ctx, self.n_vocab, s, row)

    def release(self, seq: Sequence) -> None:
        """Free its sampler; its cells stay in the slot for a later prompt that starts the same way."""
        llama_sampling.free(self.L, seq.state)
        seq.state = None
        self.index.touch(seq.slot)

    def _forget(self) -> None:
        """Drop every cached cell: they were computed with weights that are about to change."""
        mem = self.L.llama_get_memory(self.ctx)
        for slot in range(self.prefix_seq):
            self.L.llama_memory_seq_rm(mem, slot, -1, -1)
        self.index.clear()
        self.saved.clear()
        self.prefix = []
        self._prefix_due = True

    def apply_adapter(self, adapter: Any) -> None:
        """Load `adapter.gguf_path` (a GGUF LoRA); None returns to the base model."""
        L = self.L
        if adapter is None:
            self._use_lora(False)
            self._lora = None
            self._forget()
            return
        path = adapter.gguf_path
        if path is None:
            raise EngineError(f"The adapter {adapter.id} has no adapter.gguf, which the llama.cpp engine needs.",
                              "Export the adapter to GGUF (the trainer does this for llama.cpp tiers).")
        lora = L.llama_adapter_lora_init(self.model, str(path).encode())
        if not lora:
            raise EngineError(f"llama.cpp could not load the LoRA adapter {path}.")
        previous, self._lora = self._lora, lora
        self._lora_on = False
        try:
            self._use_lora(True)
        except EngineError:
            self._lora = previous
            L.llama_set_adapters_lora(self.ctx, None, 0, None)
            raise
        # The previous adapter stays allocated until the model is freed (llama.cpp owns it); swaps are rare.
        self._forget()

    def close(self) -> None:
        L = self.L
        if getattr(self, "batch", None) is not None:
            L.llama_batch_free(self.batch)
            self.batch = None
        if getattr(self, "ctx", None):
            L.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            L.llama_model_free(self.model)
            self.model = None
