"""Write an SVG screenshot of a console screen on the recorded data: `python -m appliance.console.screenshot
docs/console.svg [--screen dashboard]` (the README's picture)."""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "console"


async def capture(out: Path, screen: str, size: tuple[int, int]) -> None:
    from appliance.console.app import ConsoleApp
    from appliance.console.sources.recorded import recorded_sources

    with tempfile.TemporaryDirectory() as tmp:
        app = ConsoleApp(recorded_sources(FIXTURES, Path(tmp) / "root"), first=screen)
        async with app.run_test(size=size) as pilot:
            for _ in range(100):  # until both recorded scrapes and the overview are painted
                s = app.screen
                if getattr(s, "complete", True) and getattr(s, "scrapes", [1, 1]).__len__() >= 2:
                    break
                await pilot.pause(0.05)
            await pilot.pause(0.2)
            out.parent.mkdir(parents=True, exist_ok=True)
            app.save_screenshot(filename=out.name, path=str(out.parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out", type=Path)
    ap.add_argument("--screen", default="dashboard")
    ap.add_argument("--size", default="80x24", help="COLSxROWS")
    args = ap.parse_args()
    cols, rows = (int(x) for x in args.size.split("x"))
    asyncio.run(capture(args.out, args.screen, (cols, rows)))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
