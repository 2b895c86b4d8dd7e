"""The cores a test may use: `make test` runs the suite on pytest-xdist workers, and the machine's cores
are divided among them (a second thread spinning on a core another worker holds slows both by an order
of magnitude)."""

from __future__ import annotations

import os

WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
CORES_EACH = max(1, (os.cpu_count() or 1) // WORKERS)
