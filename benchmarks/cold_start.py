"""What a fresh install costs: the first ``python -m studies run batch_size_scaling`` with an empty
numba cache against the same command once the cache is warm.

Each run is a separate process (as a user meets it), with its own empty output folder so nothing is
resumed; the cold run gets a new, empty ``NUMBA_CACHE_DIR``, the warm runs reuse it.  Prints the
wall times of the whole command (interpreter start, imports, compile or cache load, the study, the
figure), and the ratio cold / median warm.

    python benchmarks/cold_start.py            # 1 cold run, 3 warm runs
    python benchmarks/cold_start.py --quick    # the --quick scale of the study
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(cache: str, out: str, quick: bool) -> float:
    env = dict(os.environ, NUMBA_CACHE_DIR=cache)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "studies", "run", "batch_size_scaling", "--out", out, "--no-progress"]
    if quick:
        cmd.append("--quick")
    t = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the study's --quick scale")
    p.add_argument("--warm", type=int, default=3, help="warm runs (default 3)")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        cache = os.path.join(tmp, "numba-cache")
        cold = _run(cache, os.path.join(tmp, "out-cold"), a.quick)
        warm = [_run(cache, os.path.join(tmp, f"out-warm{i}"), a.quick) for i in range(a.warm)]
    med = statistics.median(warm)
    print(f"batch_size_scaling{' --quick' if a.quick else ''}, {os.cpu_count()} cores")
    print(f"cold (empty numba cache): {cold:6.1f} s")
    print(f"warm (median of {a.warm}):     {med:6.1f} s   ({', '.join(f'{w:.1f}' for w in warm)})")
    print(f"cold / warm: {cold / med:.2f}x")


if __name__ == "__main__":
    main()
