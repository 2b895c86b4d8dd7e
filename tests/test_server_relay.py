"""Engine events reach the event loop in bursts: one wake-up carries every event put since the last."""

from __future__ import annotations

import asyncio
import threading

from appliance.engines.scheduler import Delta, Finished
from appliance.server.serving import _Relay


def test_events_put_together_arrive_in_one_wake_up_and_in_order():
    async def main():
        loop = asyncio.get_running_loop()
        relay = _Relay(loop)
        wakeups = 0
        flush = relay._flush

        def counting_flush():
            nonlocal wakeups
            wakeups += 1
            flush()

        relay._flush = counting_flush
        a: asyncio.Queue = asyncio.Queue()
        b: asyncio.Queue = asyncio.Queue()
        fin = Finished("stop", 3, 2, None, "xy")
        # The engine thread puts five events while the loop is busy; the loop then wakes once.
        t = threading.Thread(target=lambda: [relay.put(q, ev) for q, ev in
                                             [(a, Delta("x")), (b, Delta("p")), (a, Delta("y")), (b, Delta("q")), (a, fin)]])
        t.start()
        t.join()
        await asyncio.sleep(0.05)
        got_a = [a.get_nowait() for _ in range(a.qsize())]
        got_b = [b.get_nowait() for _ in range(b.qsize())]
        # a later event after the flush wakes the loop again
        relay.put(b, Delta("r"))
        await asyncio.sleep(0.05)
        return wakeups, got_a, got_b, b.get_nowait()

    wakeups, got_a, got_b, late = asyncio.run(main())
    assert got_a == [Delta("x"), Delta("y"), Finished("stop", 3, 2, None, "xy")]
    assert got_b == [Delta("p"), Delta("q")] and late == Delta("r")
    assert wakeups == 2
