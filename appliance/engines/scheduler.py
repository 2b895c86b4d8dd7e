"""The engine interface the server uses, and the batch scheduler both engines share.

An `Engine` owns one thread that runs the decode loop. Requests (`submit`) wait in a bounded queue;
between decode steps the loop admits as many as there are free slots, and one backend call then
advances every live sequence by one token and prefills the next chunk of the newcomers' prompts
(continuous batching, chunked prefill: a long prompt never holds up the live answers for more than
`prefill_chunk` tokens' work a step). The
backend (llama.cpp or transformers) only knows how to do that one step; stop strings, limits,
cancellation, adapter swaps and the text sent back are handled here, once, for both.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from appliance.config import ServerConfig
from appliance.engines import admission
from appliance.engines.prefix_cache import common_prefix
from appliance.engines.sequences import Delta, Event, Finished, SamplingParams, Sequence, Sink, TokenLogprob
from appliance.engines.step_cost import SHORT_PROMPT, StepCost
from appliance.errors import EngineError

__all__ = ["Delta", "Engine", "Event", "Finished", "QueueFull", "SamplingParams", "Sequence", "Sink", "TokenLogprob",
           "generate", "warm_up"]

DEFAULT_PREFILL_CHUNK = ServerConfig.prefill_chunk
DEFAULT_PREFILL_SHARE = ServerConfig.prefill_share
MIN_FOLLOW = 32  # shared prompt tokens worth waiting for another sequence to prefill, instead of computing them


class QueueFull(EngineError):
    """More requests are waiting than the queue holds, or they would wait longer than the bound."""

    http_status = 429
    openai_type = "rate_limit_error"

    def __init__(self, message: str, retry_after: int | None = None, code: str = "queue_full") -> None:
        super().__init__(message)
        self.retry_after, self.code = retry_after, code  # Retry-After from the measured drain rate (None: not measured)


class Backend(Protocol):
    """What an engine backend does; everything else is the scheduler's job."""

    # `claim` gives an admitted sequence one of the free slots (the one whose cache holds the longest
    # part of its prompt, where the backend keeps finished sequences' cells) and sets its `prefilled`.
    # `step` computes up to `chunk` more prompt tokens of each sequence in `admit` and one token of
    # each in `live`; it returns, for `live` then `admit`, the next token, or None for a sequence
    # whose prompt is not all in the cache yet.
    def tokenize(self, text: str) -> list[int]: ...
    def render_chat(self, messages: list[dict[str, Any]]) -> str: ...
    def claim(self, seq: Sequence, free: list[int]) -> int: ...
    def step(self, admit: list[Sequence], live: list[Sequence]) -> list[int | None]: ...
    def release(self, seq: Sequence) -> None: ...
    # Optional, `adopt(seq, src, n)`: copy slot `src`'s first `n` cells into `seq`'s slot, set its `prefilled` to n.
    def detokenize(self, tokens: list[int]) -> str: ...
    def is_end(self, token: int) -> bool: ...
    def apply_adapter(self, adapter: Any) -> None: ...
    def prefill_budget(self) -> int: ...
    def close(self) -> None: ...


def _stop_cut(text: str, stops: tuple[str, ...]) -> tuple[int | None, int]:
    """(index where a stop string starts or None, how many trailing chars may begin one)."""
    hits = [i for s in stops if (i := text.find(s)) >= 0]
    if hits:
        return min(hits), 0
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return None, hold


class Engine:
    """The server's one handle on a model: submit, cancel, swap adapters, report load."""

    def __init__(self, backend: Backend, *, model_id: str, context_length: int, max_batch: int, max_queue: int,
                 adapter_id: str | None = None, backend_name: str = "", max_queue_wait_s: float = 0.0,
                 clock: Callable[[], float] = time.monotonic, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 prefill_share: float = DEFAULT_PREFILL_SHARE) -> None:
        self.backend = backend
        self.model_id = model_id
        self.backend_name = backend_name
        self.context_length = context_length
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_queue_wait_s = max_queue_wait_s  # refuse a request expected to wait longer for a slot; 0: no bound
        self._clock = clock
        self._drain = admission.DrainRate(window=4 * max_batch, min_finished=max_batch)
        self._drain_lock = threading.Lock()  # its own: a Finished may be emitted with or without _cv held
        self.adapter_id = adapter_id
        self._cv = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        self._live: list[Sequence] = []
        self._prefilling: list[Sequence] = []  # admitted, holding a slot, prompt not all in the cache yet
        self._adopt: Callable[[Sequence, int, int], None] | None = getattr(backend, "adopt", None)
        self.prefill_chunk = prefill_chunk  # prompt tokens computed per step, all prefilling sequences together; 0: whole prompts
        self.prefill_share = prefill_share  # while answers stream, the most share of a step's time the prefill takes
        self.cost = StepCost()
        self._free_slots = list(range(max_batch - 1, -1, -1))
        self._pending_adapter: tuple[Any, threading.Event] | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self.steps = 0
        self.adapter_error: str | None = None
        self.on_step: Callable[[Engine], None] | None = None  # metrics hook

    # --- used by the server -------------------------------------------------------------------
    @property
    def started(self) -> bool:
        return self._thread.ident is not None

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        self.backend.close()

    def tokenize(self, text: str) -> list[int]:
        return self.backend.tokenize(text)

    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        return self.backend.render_chat(messages)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def prefix_reused_tokens(self) -> int:
        """Prompt tokens taken from cached prefixes instead of being prefilled, since the start."""
        return int(getattr(self.backend, "reused_tokens", 0))

    @property
    def live(self) -> int:
        """Sequences holding a batch slot: decoding, or admitted and being prefilled right now."""
        return self.max_batch - len(self._free_slots)

    def submit(self, prompt: list[int], params: SamplingParams, sink: Sink) -> Sequence:
        """Queue a request; events arrive on `sink` from the engine thread. Raises QueueFull."""
        if not prompt:
            raise EngineError("The prompt is empty.")
        if len(prompt) >= self.context_length:
            raise EngineError(f"The prompt has {len(prompt)} tokens; the context holds {self.context_length}.")

        def counted(ev: Event) -> None:  # every sequence ends with exactly one Finished: the drain rate's sample
            if isinstance(ev, Finished):
                with self._drain_lock:
                    self._drain.finished_one(self._clock())
            sink(ev)

        seq = Sequence(prompt, params, counted)
        with self._cv:
            if self._stopping:
                raise EngineError("The engine is shutting down.")
            # The live batch plus `max_queue` waiting, and no more than `max_queue_wait_s` of expected
            # wait; anything beyond is refused, not buffered.
            with self._drain_lock:
                now = self._clock()
                refused = admission.check(self._drain, now, waiting=len(self._waiting), free_slots=len(self._free_slots),
                                          max_queue=self.max_queue, max_wait_s=self.max_queue_wait_s)
                if refused:
                    raise QueueFull(refused.message, refused.retry_after, refused.code)
                self._drain.submitted(now)
            self._waiting.append(seq)
            self._cv.notify_all()
        return seq

    def swap_adapter(self, adapter: Any, wait: float | None = None) -> bool:
        """Use `adapter` (or None: the base model) from the next batch on; True once applied.

        Live sequences finish on the adapter they started with; new ones wait until the swap is
        done, so no request fails or mixes two adapters.
        """
        done = threading.Event()
        with self._cv:
            self._pending_adapter = (adapter, done)
            self._cv.notify_all()
        return done.wait(wait) if wait else done.is_set()

    # --- the decode loop ----------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._stopping or self._waiting or self._live or self._prefilling or self._pending_adapter):
                    self._cv.wait()
                if self._stopping:
                    for s in [*self._live, *self._prefilling, *self._waiting]:
                        self._finish(s, "cancelled")
                    self._live.clear()
                    self._prefilling.clear()
                    self._waiting.clear()
                    return
                for s in [s for s in self._waiting if s.cancelled]:
                    self._waiting.remove(s)
                    self._emit(s, self._finished(s, "cancelled"))
                pending = self._pending_adapter
            for s in [s for s in [*self._live, *self._prefilling] if s.cancelled]:
                self._drop(s, "cancelled")
            if pending and not (self._live or self._prefilling):
                self._apply_adapter(*pending)
                continue
            if not pending:
                self._prefilling.extend(self._admit())
            if self._prefilling or self._live:
                self._step()

    def _step(self) -> None:
        """One backend step: every live sequence's next token, and the next chunk of the prompts being prefilled."""
        prefill, live = list(self._prefilling), list(self._live)
        self._plan_chunks(prefill, len(live))
        t0 = time.perf_counter()
        try:
            tokens = self.backend.step(prefill, live)
            self.cost.observe(len(live), sum(s.chunk for s in prefill), time.perf_counter() - t0)
        except Exception as e:  # a failed step fails its sequences, never the server
            for s in [*prefill, *live]:
                self._drop(s, "error", f"{type(e).__name__}: {e}")
            return
        self._adopt_ready(prefill)
        produced = list(zip([*live, *prefill], tokens, strict=True))  # the backend answers for `live` first
        started = {id(s) for s, tok in produced[len(live):] if tok is not None}
        self._prefilling = [s for s in prefill if id(s) not in started]
        self._live.extend(s for s in prefill if id(s) in started)
        for s, tok in produced:
            if tok is None:  # mid-prefill: no token this step
                continue
            try:
                self._advance(s, tok)
            except Exception as e:  # one bad sequence must not stop the decode thread
                self._drop(s, "error", f"{type(e).__name__}: {e}")
        self.steps += 1
        if self.on_step:
            self.on_step(self)

    def _plan_chunks(self, prefill: list[Sequence], live: int) -> None:
        """How many prompt tokens each prefilling sequence gets this step: first come, first served, up to
        `prefill_chunk` in all, less while answers stream (`prefill_share` of the step's time; step_cost.py),
        and no more than one backend call holds beside the live sequences' tokens."""
        budget = self.backend.prefill_budget() - live
        if self.prefill_chunk > 0:
            budget = min(budget, self.prefill_chunk)
        timed = min(budget, self.cost.chunk(live, self.prefill_share, self.prefill_chunk))
        for s in prefill:
            if s.follows and s.follows[0].slot < 0:  # the one it waited for is gone (cancelled, failed): on its own
                s.follows = None
            need = 0 if s.follows else len(s.prompt) - s.prefilled
            s.chunk = need if self.prefill_chunk <= 0 else max(0, min(need, budget if need <= SHORT_PROMPT else timed))
            budget -= s.chunk
            timed = min(budget, timed - s.chunk)

    def _admit(self) -> list[Sequence]:
        """Waiting sequences that get a slot now; unchunked, only as many whole prompts as one step holds."""
        budget = self.backend.prefill_budget() - len(self._live)
        admit: list[Sequence] = []
        with self._cv:
            while self._waiting and self._free_slots and not self._waiting[0].cancelled:
                n = len(self._waiting[0].prompt)
                if admit and n > budget and self.prefill_chunk <= 0:
                    break
                s = self._waiting.popleft()
                s.slot = self.backend.claim(s, list(self._free_slots))
                self._free_slots.remove(s.slot)
                s.adapter = self.adapter_id if s.params.use_adapter else None
                budget -= n
                self._find_leader(s, [*self._prefilling, *admit])
                admit.append(s)
        return admit

    def _find_leader(self, s: Sequence, prefilling: list[Sequence]) -> None:
        """Have `s` wait for the prefilling sequence whose prompt starts like its own for the most tokens
        beyond what its slot already holds (requests that arrive together with one system prompt): that
        start is then computed once and copied, not prefilled by each."""
        if self._adopt is None:
            return
        best, most = None, s.prefilled + MIN_FOLLOW
        for leader in prefilling:
            if leader.params.use_adapter == s.params.use_adapter:
                n = common_prefix(leader.prompt[:-1], s.prompt[:-1])  # the last prompt token is always decoded
                if n >= most:
                    best, most = leader, n
        s.follows = (best, most) if best else None

    def _adopt_ready(self, prefill: list[Sequence]) -> None:
        """Copy the cells of each leader that has now prefilled what its followers wait for."""
        for s in prefill:
            if s.follows and s.follows[0].prefilled >= s.follows[1] and s.follows[0].slot >= 0 and self._adopt:
                self._adopt(s, s.follows[0].slot, s.follows[1])
                s.follows = None

    def _apply_adapter(self, adapter: Any, done: threading.Event) -> None:
        try:
            self.backend.apply_adapter(adapter)
            self.adapter_id = getattr(adapter, "id", None)
            self.adapter_error = None
        except Exception as e:  # keep serving with the adapter we had; the reload route reports this
            self.adapter_error = f"{getattr(adapter, 'id', adapter)}: {e}"
        finally:
            with self._cv:
                if self._pending_adapter and self._pending_adapter[1] is done:
                    self._pending_adapter = None
            done.set()

    def _advance(self, s: Sequence, tok: int) -> None:
        if self.backend.is_end(tok) and not s.params.ignore_eos:
            self._drop(s, "stop")
            return
        s.generated.append(tok)
        text = self.backend.detokenize(s.generated)
        cut, hold = _stop_cut(text, s.params.stop)
        if cut is not None:
            self._send(s, text[:cut])
            self._drop(s, "stop", final_text=text[:cut])
            return
        limit = len(s.generated) >= s.params.max_tokens or len(s.prompt) + len(s.generated) >= self.context_length
        if limit:
            self._send(s, text)
            self._drop(s, "length", final_text=text)
            return
        # Hold back an unfinished UTF-8 character and anything that may be the start of a stop string.
        end = len(text) - hold
        while end > s.sent and text[end - 1] == "\ufffd":
            end -= 1
        self._send(s, text[:end])

    def _send(self, s: Sequence, upto: str) -> None:
        if len(upto) > s.sent:
            n = len(s.generated)
            self._emit(s, Delta(upto[s.sent:], tuple(s.logprobs[s.lp_sent:n])))
            s.sent, s.lp_sent = len(upto), n

    def _finished(self, s: Sequence, reason: str, error: str | None = None, text: str | None = None) -> Finished:
        if text is None:
            text = self.backend.detokenize(s.generated) if s.generated else ""
        return Finished(reason, len(s.prompt), len(s.generated), s.adapter, text, error, tuple(s.logprobs[:len(s.generated)]))

    def _drop(self, s: Sequence, reason: str, error: str | None = None, final_text: str | None = None) -> None:
        if s in self._live:
            self._live.remove(s)
        if s in self._prefilling:
            self._prefilling.remove(s)
        if reason == "stop" and final_text is None:
            final_text = self.backend.detokenize(s.generated) if s.generated else ""
            self._send(s, final_text)
        self._finish(s, reason, error, final_text)

    def _finish(self, s: Sequence, reason: str, error: str | None = None, text: str | None = None) -> None:
        if s.slot >= 0:
            try:
                self.backend.release(s)
            finally:
                with self._cv:
                    self._free_slots.append(s.slot)
                s.slot = -1
        self._emit(s, self._finished(s, reason, error, text))

    @staticmethod
    def _emit(s: Sequence, ev: Event) -> None:
        try:
            s.sink(ev)
        except Exception:  # a closed event loop or queue: the client is gone, nothing to tell
            pass


def generate(engine: Engine, prompt: list[int], params: SamplingParams, timeout: float) -> Finished:
    """One whole generation through the running engine; raises EngineError when it does not finish in time."""
    done = threading.Event()
    box: list[Finished] = []

    def sink(ev: Event) -> None:
        if isinstance(ev, Finished):
            box.append(ev)
            done.set()

    engine.submit(prompt, params, sink)
    if not done.wait(timeout):
        raise EngineError(f"The generation did not finish within {timeout:.0f} s.")
    return box[0]


def warm_up(engine: Engine, timeout: float = 120.0) -> str:
    """One short generation through the whole engine; raises EngineError when it fails."""
    t0 = time.monotonic()
    done = generate(engine, engine.tokenize(engine.render_chat([{"role": "user", "content": "Hello"}])),
                    SamplingParams(max_tokens=4, temperature=0), timeout)
    if done.reason == "error":
        raise EngineError(f"The warm-up generation failed: {done.error}.")
    return f"{done.completion_tokens} tokens in {time.monotonic() - t0:.2f} s"
