"""The install step that proves the new release's engine answers on this host before anything is switched.

Importing the engine (installer.system.release.check_engine_loads) finds a missing system library; only
decoding a real prompt finds an engine built for instructions this CPU lacks, which dies by SIGILL
at the first batch. appliance.engines.selftest runs that decode (appliance.engines.selftest_decode) in a child process of the new
release's venv, with the tier's model settings, and says what died, on which CPU, and what to do.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from installer.steps.framework import Skip, step
from installer.system.release import check_engine_loads, read_release


@step("engine", "decode a test prompt with the new release's engine on this CPU")
def step_engine(ctx: Any, progress: Callable[[str, float | None], None]) -> str:
    from appliance.engines import selftest

    if ctx.dry_run:
        raise Skip("dry run")
    release = read_release(ctx.layout.releases / ctx.release_id)
    if release is None or "server" not in release.info.get("extras", []):
        raise Skip("this release carries no server")  # a test bundle's bare wheelhouse
    if ctx.planned().embeddings is not None:  # the embedding model runs on transformers whatever the chat engine
        progress("importing the embedding model's engine (torch, transformers) in the new release", None)
        check_engine_loads(ctx.runner, release.dir / "venv", "transformers")
    progress("decoding a test prompt with the new release's engine on this CPU", None)
    result = selftest.run(release.dir / "venv" / "bin" / "python", ctx.layout.root, ctx.planned().model_settings)
    return result.summary()
