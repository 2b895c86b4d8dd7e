"""Admission by expected wait: the drain-rate estimator, the real scheduler under a flood, the real server's 429.

The scheduler and the server are the real code with the scripted model (tests/scripted_engine.py);
time is a clock the model advances by a fixed amount per decode step, so waits are measured in
steps, never in wall-clock speed.
"""

from __future__ import annotations

import math
import threading

import httpx
import openai
import pytest

from appliance.engines import admission
from appliance.engines.admission import DrainRate
from appliance.engines.scheduler import Delta, Engine, Finished, QueueFull, SamplingParams
from appliance.server.app import Settings, create_app
from tests.scripted_engine import ScriptedBackend
from tests.server_fixtures import live_server, running, scripted_root
from tests.waiting import wait_until

# --- the estimator, on synthetic timestamps -----------------------------------------------------

def drained(finishes: list[float], window: int = 8, start: float = 0.0) -> DrainRate:
    """A DrainRate that saw one sequence per finish submitted at `start`, finishing at those times."""
    d = DrainRate(window=window)
    for _ in finishes:
        d.submitted(start)
    for t in finishes:
        d.finished_one(t)
    return d


def test_steady_finishes_give_their_rate():
    d = drained([0.5 * i for i in range(1, 41)])
    assert d.interval(20.0) == pytest.approx(0.5)
    assert d.rate(20.0) == pytest.approx(2.0)


def test_a_whole_batch_finishing_at_once_averages_out():
    """8 sequences finish together every 4 s: 2 per second, not infinitely many and not 0.25."""
    d = drained([4.0 * r for r in range(1, 11) for _ in range(8)], window=32)
    assert d.rate(40.0) == pytest.approx(2.0, rel=0.3)


def test_a_request_behind_a_batch_that_finishes_together_waits_a_whole_batch_first():
    """Even finishes: the first needed one comes an interval away; a batch finishing in one step: a round away."""
    even = drained([0.5 * i for i in range(1, 81)], window=32)
    assert admission.expected_wait(even, 40.0, waiting=8, free_slots=0) == pytest.approx(9 * 0.5)
    bursts = drained([4.0 * r for r in range(1, 11) for _ in range(8)], window=32)
    # 9 finishes needed: this round's 8, then one of the next: 2 rounds, 8 s (not 9 x 0.5 s)
    assert admission.expected_wait(bursts, 40.0, waiting=8, free_slots=0) == pytest.approx(8.0, rel=0.15)


def test_idle_time_does_not_count_and_nothing_measured_is_none():
    assert DrainRate(window=4).interval(5.0) is None
    d = drained([1.0, 2.0, 3.0, 4.0])
    d.submitted(1000.0)  # an hour idle, then busy again
    d.finished_one(1001.0)
    assert d.interval(1001.0) == pytest.approx(1.0)


def test_a_stall_raises_the_interval_before_anything_finishes():
    d = drained([1.0, 2.0, 3.0, 4.0])
    d.submitted(4.0)
    assert d.interval(4.5) == pytest.approx(1.0)
    assert d.interval(30.0) > 3.0  # 26 s without a finish while busy


def test_the_rate_follows_a_change_within_its_window():
    d = drained([0.1 * i for i in range(1, 101)], window=8)  # fast answers, then slow ones
    for i in range(1, 25):
        d.submitted(10.0)
        d.finished_one(10.0 + 2.0 * i)
    assert d.interval(58.0) == pytest.approx(2.0, rel=0.05)


def test_check_refuses_by_time_with_retry_after_from_the_rate():
    d = drained([1.0, 2.0, 3.0, 4.0])  # one finish a second
    kw = dict(free_slots=0, max_queue=100, max_wait_s=5.0)
    assert admission.check(d, 4.0, waiting=3, **kw) is None  # needs 4 finishes: 4 s
    r = admission.check(d, 4.0, waiting=8, **kw)  # needs 9: 9 s, 4 over the bound
    assert r is not None and r.code == "queue_wait" and r.retry_after == 4
    assert "9.0 s" in r.message and r.message.endswith("retry in 4 s.") and ". " not in r.message
    assert admission.check(d, 4.0, waiting=8, free_slots=0, max_queue=100, max_wait_s=0) is None  # 0: no bound
    assert admission.check(d, 4.0, waiting=8, free_slots=5, max_queue=100, max_wait_s=5.0) is None  # free slots count
    assert admission.check(DrainRate(window=4), 4.0, waiting=80, **kw) is None  # nothing measured: count only


def test_check_refuses_by_count_with_retry_after_from_the_rate():
    d = drained([2.0, 4.0, 6.0, 8.0])
    r = admission.check(d, 8.0, waiting=10, free_slots=0, max_queue=10, max_wait_s=0)
    assert r is not None and r.code == "queue_full" and r.retry_after == 2 and "10 requests" in r.message
    cold = admission.check(DrainRate(window=4), 0.0, waiting=10, free_slots=0, max_queue=10, max_wait_s=0)
    assert cold is not None and cold.retry_after is None


# --- the real scheduler under a flood -------------------------------------------------------------

class StepClock:
    """Time that passes only in decode steps."""

    def __init__(self, step_s: float) -> None:
        self.t, self.step_s = 0.0, step_s

    def __call__(self) -> float:
        return self.t


class ClockedBackend(ScriptedBackend):
    """The scripted model, each step taking `clock.step_s`; `during_step` runs inside each step (arrivals)."""

    def __init__(self, clock: StepClock) -> None:
        super().__init__()
        self.clock = clock
        self.during_step: list = []
        self.gate = threading.Event()
        self.gate.set()

    def step(self, *args):  # type: ignore[no-untyped-def]
        assert self.gate.wait(60), "the test never let the engine go on"
        self.clock.t += self.clock.step_s
        out = super().step(*args)
        for f in list(self.during_step):
            f()
        return out


class Flood:
    """`per_step` requests arrive in each of `steps` decode steps; records each one's wait or refusal."""

    def __init__(self, engine: Engine, clock: StepClock, per_step: int, steps: int) -> None:
        self.engine, self.clock, self.per_step, self.left = engine, clock, per_step, steps
        self.waits: list[float] = []  # submit to first answer text, accepted requests
        self.refused: list[QueueFull] = []
        self.finished = 0
        self.sent = 0

    def arrive(self) -> None:
        if self.left <= 0:
            return
        self.left -= 1
        for _ in range(self.per_step):
            self.submit()

    def submit(self) -> None:
        t0, first = self.clock(), [True]
        self.sent += 1

        def sink(ev: object) -> None:
            if isinstance(ev, Delta) and first[0]:
                first[0] = False
                self.waits.append(self.clock() - t0)
            elif isinstance(ev, Finished):
                self.finished += 1

        length = 6 + (self.sent * 7) % 25  # answers of 6 to 30 tokens, staggered
        try:
            self.engine.submit([ord("q")], SamplingParams(max_tokens=length, temperature=0), sink)
        except QueueFull as e:
            self.refused.append(e)


def flood(max_queue_wait_s: float) -> Flood:
    """About 25x what 4 slots drain (4 / 18 a step), for 60 steps of 0.1 s, after 4 answers measured the rate."""
    clock = StepClock(0.1)
    backend = ClockedBackend(clock)
    engine = Engine(backend, model_id="m", context_length=512, max_batch=4, max_queue=1000,
                    max_queue_wait_s=max_queue_wait_s, clock=clock)
    with running(engine):
        warm = Flood(engine, clock, 4, 0)
        for _ in range(4):
            warm.submit()
        wait_until(lambda: warm.finished == 4, "the first answers finished")
        f = Flood(engine, clock, per_step=6, steps=60)
        backend.during_step.append(f.arrive)
        f.submit()  # the engine steps again; the rest arrive inside its steps
        wait_until(lambda: f.left == 0 and f.finished + len(f.refused) == f.sent, "the flood was answered")
    return f


def test_a_flood_is_partly_refused_and_the_accepted_wait_within_the_bound():
    bound = 2.0  # 20 steps
    f = flood(bound)
    assert f.sent == 361 and 0 < len(f.refused) < f.sent and len(f.waits) == f.sent - len(f.refused)
    assert all(e.code == "queue_wait" and isinstance(e.retry_after, int) and e.retry_after >= 1 for e in f.refused)
    assert all(f"retry in {e.retry_after} s." in e.message for e in f.refused)
    waits = sorted(f.waits)
    assert waits[math.ceil(0.99 * len(waits)) - 1] <= bound + 0.1 + 1e-9, waits[-10:]  # p99, one step of slack
    assert waits[-1] <= 1.5 * bound, waits[-10:]


def test_without_the_time_bound_the_same_flood_waits_far_longer():
    """The control: only max_queue (1000) bounds the queue, and accepted requests wait many times the bound."""
    f = flood(0.0)
    assert not f.refused and max(f.waits) > 10 * 2.0


# --- the real server and the official client --------------------------------------------------------

def test_the_openai_client_gets_429_with_the_computed_retry_after(tmp_path):
    root = scripted_root(tmp_path / "r", max_batch=1, max_queue=8)
    cfg = root.config
    clock = StepClock(1.0)
    backend = ClockedBackend(clock)
    engine = Engine(backend, model_id=cfg.model.id, context_length=cfg.model.context_length, max_batch=1, max_queue=8,
                    max_queue_wait_s=0.0, clock=clock, backend_name="scripted")
    app = create_app(Settings(root.layout, cfg.server, cfg.model.id, watch_adapters=False), engine)
    with live_server(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=root.user_key, max_retries=0)
        # The warm-up's answer is all the engine has measured: one finish per `per` seconds of steps.
        per = clock.t
        assert per > 0 and engine.live == engine.waiting == 0
        engine.max_queue_wait_s = 2.5 * per  # the live one plus 2 waiting fit; a third would wait 3 * per
        backend.gate.clear()
        events: list[list] = [[], [], []]
        seqs = [engine.submit([ord("q")], SamplingParams(max_tokens=3, temperature=0), events[i].append) for i in range(3)]
        try:
            wait_until(lambda: engine.live == 1 and engine.waiting == 2, "one request live and two waiting")
            with pytest.raises(openai.RateLimitError) as e:
                client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        finally:
            backend.gate.set()
        retry = math.ceil(3 * per - 2.5 * per)
        assert e.value.response.headers["Retry-After"] == str(retry) != str(1 + 2 // 1)  # not the count-based guess
        err = e.value.body
        assert e.value.code == "queue_wait" and err["type"] == "rate_limit_error"
        assert err["message"].endswith(f"retry in {retry} s.") and err["message"].count(". ") == 0
        wait_until(lambda: all(ev and isinstance(ev[-1], Finished) for ev in events), "the accepted requests finished")
        assert [ev[-1].reason for ev in events] == ["length"] * 3 and all(s.slot == -1 for s in seqs)
        scraped = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {root.user_key}"}).text
        assert 'appliance_overload_refusals_total{reason="queue_wait"} 1.0' in scraped


# --- the setting ---------------------------------------------------------------------------------

def test_the_setting_is_validated_and_reaches_the_engine(tmp_path, smollm2_gguf):
    from appliance.config import ConfigError, ServerConfig, validate_section
    from appliance.engines import load_engine
    from tests.server_fixtures import make_root

    assert ServerConfig().max_queue_wait_s == 10.0
    assert validate_section(ServerConfig, "server", {"max_queue_wait_s": 3}).max_queue_wait_s == 3.0
    with pytest.raises(ConfigError, match="max_queue_wait_s is -1.0; it must be at least 0"):
        validate_section(ServerConfig, "server", {"max_queue_wait_s": -1})
    root = make_root(tmp_path, smollm2_gguf, max_batch=2, max_queue=2)
    engine = load_engine(root.config.model, root.layout, max_batch=2, max_queue=2, max_queue_wait_s=3.5)
    try:
        assert engine.max_queue_wait_s == 3.5
    finally:
        engine.close()
