"""The scheduler's pure parts: stop strings held back across token boundaries."""

from __future__ import annotations

import pytest

from appliance.engines.scheduler import _stop_cut


@pytest.mark.parametrize("text, stops, expected", [
    ("hello world", (), (None, 0)),
    ("hello world", ("wor",), (6, 0)),
    ("hello wo", ("world",), (None, 2)),   # "wo" may begin "world": hold it back
    ("hello w", ("xyz", "wow"), (None, 1)),
    ("a\n\nb", ("\n\n", "b"), (1, 0)),     # the earliest stop wins
    ("abc", ("c", "abcd"), (2, 0)),
])
def test_stop_cut(text, stops, expected):
    assert _stop_cut(text, stops) == expected
