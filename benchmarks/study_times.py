"""How long each study takes from scratch: the times README's gallery quotes.

Runs ``python -m studies run NAME [--quick | --full] --out TMP --no-progress`` for each study named
(default: every study of ``python -m studies list``) in a separate process with a new, empty output
folder, so nothing is resumed, and the numba cache as it is (run it twice, or once after
``python -m studies run batch_size_scaling``, for warm-cache times). Prints one line per study:
the wall time of the whole command (interpreter start, imports, the study, its figure), the
machine's core count and its load average before the run, so a number says the conditions it was
measured in.

    python benchmarks/study_times.py                        # every study, default scale
    python benchmarks/study_times.py rate_vs_floor --quick  # one study at the quick scale
    python benchmarks/study_times.py theory_vs_practice --scheduler local
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def time_study(name: str, flags: list[str]) -> float:
    """Wall seconds of one ``python -m studies run NAME *flags`` into a new, empty folder."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "studies", "run", name, *flags, "--out", out, "--no-progress"]
        t = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
        return time.perf_counter() - t


def main(argv=None):
    from studies import STUDIES

    p = argparse.ArgumentParser(description="Wall time of each study from scratch (the times README quotes).")
    p.add_argument("names", nargs="*", help="studies to time (default: all of `python -m studies list`)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="the studies' --quick scale")
    g.add_argument("--full", action="store_true", help="the studies' --full scale (hours)")
    p.add_argument("--scheduler", default=None, help="passed to studies that take it (e.g. 'local')")
    a = p.parse_args(argv)
    unknown = [n for n in a.names if n not in STUDIES]
    if unknown:
        p.error(f"unknown studies {unknown}; known: {', '.join(STUDIES)}.")
    flags = ["--quick"] if a.quick else ["--full"] if a.full else []
    for name in a.names or list(STUDIES):
        extra = list(flags)
        if a.scheduler and "--scheduler" in _help(name):
            extra += ["--scheduler", a.scheduler]
        load = os.getloadavg()[0]
        seconds = time_study(name, extra)
        scale = "quick" if a.quick else "full" if a.full else "default"
        print(f"{name:24s} {scale:8s} {seconds:8.1f} s   ({os.cpu_count()} cores, load average before {load:.2f}; "
              f"{time.strftime('%Y-%m-%d')}; flags {' '.join(extra) or 'none'})", flush=True)


def _help(name: str) -> str:
    out = subprocess.run([sys.executable, "-m", "studies", "run", name, "-h"], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])))
    return out.stdout


if __name__ == "__main__":
    main()
