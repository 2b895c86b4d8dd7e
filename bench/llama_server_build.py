"""llama.cpp's own C++ server, `llama-server`, built once from the llama.cpp our wheel vendors.

    .venv/bin/python bench/llama_server_build.py [--cache DIR] [--jobs N] [--host-variant]   # how it was built, its path

The sources are the ones vendored in llama-cpp-python's sdist at the version the project pins
(installer/toolchain/llama_wheel.py: fetched hash-checked by the same code), so both servers run the
same llama.cpp. The CPU code is built the way the portable wheel builds it: `GGML_NATIVE=OFF` (never
`-march=native`), one `libggml-cpu-<variant>.so` per x86-64 level in the wheel's variant list (no AMX
one), the best loaded at start by llama.cpp's own loader from the executable's folder. Nothing is
downloaded at build time besides the sdist (no prebuilt web UI, no OpenSSL).

The result lives in `~/.cache/appliance/llama-server/<version>/` (`bin/` and `build.json`, which
records the flags); a second run with the same recipe finds it there and returns at once. With
`--host-variant` only the CPU library this host loads is built (10 min instead of about 45 on 2
cores), into `<version>-<variant>/`; the serving bench takes either, the whole one first.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from installer.toolchain import llama_wheel  # noqa: E402  (the pinned sdist, its hash, the CPU variants)

TARGET = "llama-server"
# The wheel's ggml flags, less the two that place files inside the wheel's layout.
GGML_FLAGS = tuple(a for a in llama_wheel.CMAKE_ARGS if a.startswith("-DGGML_") and "GGML_BACKEND_DIR" not in a)
CMAKE_FLAGS = (
    *GGML_FLAGS, "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DCMAKE_BUILD_RPATH=$ORIGIN",
    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
)
RECIPE = "recipe 1"


def build_key(variants: tuple[str, ...] = llama_wheel.VARIANTS) -> str:
    text = "\n".join([llama_wheel.SDIST_SHA256, *CMAKE_FLAGS, *variants, RECIPE])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def host_variant() -> str:
    """The wheel's CPU variant this host loads (the one our engine runs here)."""
    from appliance.engines import cpu_backend

    chosen, _ = cpu_backend.choose(cpu_backend.package_lib())
    if chosen is None:
        raise llama_wheel.BuildError("the installed llama-cpp-python has no CPU variants to choose from; run `make setup`.")
    return chosen


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "appliance" / "llama-server"


def home_of(cache: Path, variants: tuple[str, ...]) -> Path:
    return cache / (llama_wheel.VERSION if variants == llama_wheel.VARIANTS else f"{llama_wheel.VERSION}-{'-'.join(variants)}")


def cached(cache: Path, variants: tuple[str, ...] = llama_wheel.VARIANTS) -> tuple[Path, dict[str, object]] | None:
    """The built server and its record, when this recipe's build is already there."""
    home = home_of(cache, variants)
    try:
        record = json.loads((home / "build.json").read_text())
    except (OSError, ValueError):
        return None
    binary = home / "bin" / TARGET
    if record.get("key") != build_key(variants) or not binary.is_file():
        return None
    return binary, record


def _compile(src: Path, work: Path, jobs: int, log: Path) -> Path:
    """cmake + ninja in `work`, output to `log`; returns the folder holding llama-server and its libraries."""
    env = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}  # it turns ggml's SIMD off
    build = work / "build"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        subprocess.run(["cmake", "-S", str(src), "-B", str(build), *generator, *CMAKE_FLAGS],
                       env=env, check=True, stdout=out, stderr=subprocess.STDOUT)
        # ggml depends on every CPU variant's module, so the one target builds them all.
        subprocess.run(["cmake", "--build", str(build), "--target", TARGET, "-j", str(jobs)], env=env, check=True,
                       stdout=out, stderr=subprocess.STDOUT)
    return build / "bin"


def _variants_in(folder: Path) -> list[str]:
    return sorted(p.name.removeprefix("libggml-cpu-").removesuffix(".so") for p in folder.glob("libggml-cpu-*.so"))


def build(cache: Path, jobs: int | None = None,
          variants: tuple[str, ...] = llama_wheel.VARIANTS) -> tuple[Path, dict[str, object]]:
    """llama-server from the pinned sdist, built once per recipe and variant list; returns its path and how it was built."""
    hit = cached(cache, variants)
    if hit:
        return hit
    started = time.monotonic()
    jobs = jobs or os.cpu_count() or 2
    with tempfile.TemporaryDirectory(prefix="llama-server-") as tmp:
        work = Path(tmp)
        with tarfile.open(llama_wheel.fetch_sdist(work)) as tf:
            tf.extractall(work, filter="data")
        src = work / llama_wheel.SDIST.removesuffix(".tar.gz") / "vendor" / "llama.cpp"
        cmake = src / "ggml" / "src" / "CMakeLists.txt"
        cmake.write_text(llama_wheel.keep_variants(cmake.read_text(), variants))
        out = _compile(src, work, jobs, cache / f"build-{llama_wheel.VERSION}.log")
        made = _variants_in(out)
        if made != sorted(variants):
            raise llama_wheel.BuildError(f"the build made CPU variants {made}, expected {sorted(variants)}.")
        home = home_of(cache, variants)
        staging = home.with_name(home.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        (staging / "bin").mkdir(parents=True)
        for f in [out / TARGET, *out.glob("*.so*")]:
            shutil.copy2(f, staging / "bin" / f.name, follow_symlinks=False)
        version = subprocess.run([str(staging / "bin" / TARGET), "--version"], capture_output=True, text=True, timeout=60)
        record: dict[str, object] = {
            "key": build_key(variants), "llama_cpp_python": llama_wheel.VERSION, "sdist_sha256": llama_wheel.SDIST_SHA256,
            "cmake_flags": list(CMAKE_FLAGS), "cpu_variants": made, "jobs": jobs,
            "llama_cpp_version": (version.stdout + version.stderr).strip().splitlines()[:2],
            "build_seconds": round(time.monotonic() - started, 1),
        }
        (staging / "build.json").write_text(json.dumps(record, indent=2) + "\n")
        shutil.rmtree(home, ignore_errors=True)
        os.replace(staging, home)
    return home / "bin" / TARGET, record


def describe(binary: Path, record: dict[str, object], was_cached: bool) -> str:
    how = "found in the cache" if was_cached else f"built in {record['build_seconds']} s with {record['jobs']} jobs"
    return (f"llama-server: {binary} ({how})\n"
            f"  sources: llama.cpp vendored in llama-cpp-python {record['llama_cpp_python']} sdist "
            f"(sha256 {str(record['sdist_sha256'])[:16]}...); {' '.join(map(str, record['llama_cpp_version']))}\n"
            f"  cmake --target {TARGET} {' '.join(map(str, record['cmake_flags']))}\n"
            f"  CPU variants (best one loaded at start): {', '.join(map(str, record['cpu_variants']))}")


def ensure(cache: Path | None = None, jobs: int | None = None, quiet: bool = False,
           variants: tuple[str, ...] | None = None) -> Path:
    """The server's path, building it first when needed; prints how it was built unless quiet.

    `variants` None: the one the cache already holds, the wheel's whole list if it holds neither
    that nor this host's own variant; build whichever is missing then."""
    cache = cache or default_cache()
    if variants is None:
        variants = llama_wheel.VARIANTS
        if cached(cache, variants) is None and cached(cache, (host_variant(),)) is not None:
            variants = (host_variant(),)
    was_cached = cached(cache, variants) is not None
    if not was_cached and not quiet:
        took = "about 45 min" if len(variants) > 1 else "about 15 min"
        print(f"building llama-server once into {home_of(cache, variants)} ({took} on 2 cores)", flush=True)
    binary, record = build(cache, jobs, variants)
    if not quiet:
        print(describe(binary, record, was_cached), flush=True)
    return binary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=None, help="default ~/.cache/appliance/llama-server")
    ap.add_argument("--jobs", type=int, default=None, help="parallel compile jobs (default: every core)")
    ap.add_argument("--host-variant", action="store_true",
                    help="build only the CPU variant this host loads (a benchmark host; a fraction of the build time)")
    args = ap.parse_args(argv)
    try:
        print(ensure(args.cache, args.jobs, variants=(host_variant(),) if args.host_variant else None))
    except (llama_wheel.BuildError, subprocess.CalledProcessError) as e:
        log = (args.cache or default_cache()) / f"build-{llama_wheel.VERSION}.log"
        print(f"error: building llama-server failed: {e}; the build's output is in {log}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
