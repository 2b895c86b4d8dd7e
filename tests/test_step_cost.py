"""The measured step cost sizes the prefill chunk beside streaming answers (appliance.engines.step_cost)."""

from __future__ import annotations

from appliance.engines.step_cost import MIN_CHUNK, StepCost


def measured(decode: dict[int, float], per_token: float) -> StepCost:
    """Steps as the engine times them: decode-only steps at each live count, then prefill steps beside them."""
    cost = StepCost()
    for live, seconds in decode.items():
        for _ in range(3):
            cost.observe(live, 0, seconds)
    for _ in range(20):
        cost.observe(7, 64, decode[7] + 64 * per_token)
    return cost


def test_the_chunk_keeps_the_prefill_within_its_share_of_the_step():
    # 2-core SmolLM2 figures: 7 streams decode in 38 ms, a prompt token costs 0.5 ms beside them
    cost = measured({1: 0.009, 7: 0.038}, 0.0005)
    assert abs(cost.per_token - 0.0005) < 1e-9
    assert cost.chunk(7, 0.5, 256) == 76  # 38 ms of prefill beside 38 ms of decode: twice the gap
    assert cost.chunk(7, 0.4, 256) == 50  # 0.4 / 0.6 of 38 ms
    assert cost.chunk(1, 0.5, 256) == 18  # one stream decodes faster: less room
    assert cost.chunk(5, 0.5, 256) == 76  # an unmeasured count takes the nearest measured one
    assert cost.chunk(4, 0.5, 256) == 18  # 1 and 7 are as near: the faster (the smaller chunk) wins


def test_nothing_live_or_share_one_or_nothing_measured_gives_the_whole_chunk():
    cost = measured({7: 0.038}, 0.0005)
    assert cost.chunk(0, 0.5, 256) == 256
    assert cost.chunk(7, 1.0, 256) == 256
    assert StepCost().chunk(7, 0.5, 256) == 256
    slow = measured({7: 0.038}, 0.05)  # a prompt token costs more than the whole decode step: still moves on
    assert slow.chunk(7, 0.5, 256) == MIN_CHUNK
    fast = measured({7: 0.038}, 1e-6)
    assert fast.chunk(7, 0.5, 256) == 256


def test_a_step_faster_than_its_decode_alone_teaches_nothing():
    cost = measured({7: 0.038}, 0.0005)
    before = cost.per_token
    cost.observe(7, 64, 0.030)  # noise: the prefill cannot have cost less than nothing
    assert cost.per_token == before
