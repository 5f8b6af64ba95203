"""An interrupted first compile must not poison numba's on-disk cache.

Numba caches every compiled function on its own.  A process killed during its first compile leaves
some functions cached and others not; the next process compiles the rest against the cached ones.
With a cached serial function calling a ``parallel=True`` one, that state made every later process
segfault (see the note above ``_first_crossing_serial`` in :mod:`toymodels.dynamics.crossing`).  These tests
make that state for real, in subprocesses with their own cache folder, and check that the next two
(three in the slow variants) processes all give the right answer.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# the serial and the parallel (>= 32768 modes) paths of the exact first crossing
CALLS = {
    "parallel": ["NQM.power_law(40000).steps_to_target(SGD(0.5), 8, 1.5)"],
    "all": ["NQM.power_law(50).steps_to_target(SGD(0.5), 8, 1.5)",
            "NQM.power_law(40000).steps_to_target(SGD(0.5), 8, 1.5)",
            "NQM.power_law(40000).steps_to_target(Momentum(0.2, 0.8), 8, 1.5)"],
}


# SIGKILL this process when numba finishes compiling a function whose name starts with the given
# prefix, before it writes that function to the cache: its callees are cached, it is not
KILL_HOOK = """
import os, signal
from numba.core import event

class _Kill(event.Listener):
    def on_start(self, ev):
        pass

    def on_end(self, ev):
        if ev.data["dispatcher"].py_func.__name__.startswith({prefix!r}):
            os.kill(os.getpid(), signal.SIGKILL)

event.register("numba:compile", _Kill())
"""


def _script(which, kill_prefix=None):
    hook = "" if kill_prefix is None else KILL_HOOK.format(prefix=kill_prefix)
    return hook + "from toymodels import NQM, Momentum, SGD\nprint(" + ", ".join(CALLS[which]) + ")"


def _expected(which):
    import toymodels

    names = {"NQM": toymodels.NQM, "SGD": toymodels.SGD, "Momentum": toymodels.Momentum}
    return [str(eval(c, names)) for c in CALLS[which]]


def _env(cache: Path) -> dict:
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache), PYTHONFAULTHANDLER="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    return env


def _interrupt_when_cached(cache: Path, which: str, pattern: str, sig: int, timeout: float = 300.0):
    """Start the script with an empty cache and send ``sig`` as soon as a cache index matching
    ``pattern`` appears (a callee is cached, its caller still compiling)."""
    proc = subprocess.Popen([sys.executable, "-c", _script(which)], env=_env(cache), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    t0 = time.monotonic()
    while proc.poll() is None and time.monotonic() - t0 < timeout:
        if any(cache.rglob(pattern)):
            proc.send_signal(sig)
            break
        time.sleep(0.005)
    proc.communicate(timeout=timeout)
    assert any(cache.rglob(pattern)), f"the compile never cached {pattern}"
    return proc.returncode


def _runs_after(cache: Path, which: str, n: int = 3):
    """``n`` processes after the interrupt: the first compiles what is not cached against what is,
    the second loads that (the one that used to segfault), a third loads it again."""
    for i in range(n):
        out = subprocess.run([sys.executable, "-c", _script(which)], env=_env(cache), capture_output=True, text=True,
                             timeout=600)
        assert out.returncode == 0, f"run {i + 1} after the interrupt failed ({out.returncode}):\n{out.stderr[-2000:]}"
        assert out.stdout.split() == _expected(which), f"run {i + 1}: {out.stdout!r}"


@pytest.mark.slow  # 45 s of compiling; .ci/run runs it (and the other slow cache tests) after the default suite
def test_compile_killed_before_the_entry_point_is_cached(tmp_path):
    """SIGKILL at the end of the first crossing's compile, before numba caches it: every function it
    calls is cached, it is not (the state that used to segfault every process after the next)."""
    out = subprocess.run([sys.executable, "-c", _script("parallel", kill_prefix="_first_crossing")],
                         env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    assert any(tmp_path.rglob("*.nbi")) and not any(tmp_path.rglob("*_first_crossing*.nbi"))
    _runs_after(tmp_path, "parallel", n=2)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["sigint", "sigkill"])
@pytest.mark.parametrize("pattern", ["*_modal_setup_kernel-*.nbi", "*_values_range_modes-*.nbi",
                                     "*_first_crossing_serial-*.nbi", "*_mode_lower_bound-*.nbi"])
def test_compile_interrupted_anywhere(tmp_path, pattern, sig):
    _interrupt_when_cached(tmp_path, "all", pattern, sig)
    _runs_after(tmp_path, "all")


def test_warmup_is_off_when_asked_or_warm(monkeypatch):
    from toymodels import warmup

    monkeypatch.setattr(warmup, "_started", False)
    monkeypatch.setenv("TOYMODELS_NO_WARMUP", "1")
    assert warmup.start() is None
    monkeypatch.delenv("TOYMODELS_NO_WARMUP")
    monkeypatch.setattr(warmup, "cold", lambda: False)
    assert warmup.start() is None


@pytest.mark.slow
def test_warmup_caches_the_later_kernels(tmp_path):
    """On an empty cache the warm-up process compiles and caches the first-crossing kernels; a
    process after it finds them cached (and starts no second warm-up)."""
    script = ("from toymodels import warmup\n"
              "assert warmup.cold()\n"
              "p = warmup.start()\n"
              "assert p is not None and p.wait(timeout=600) == 0\n"
              "assert not warmup.cold() and warmup.start() is None\n")
    out = subprocess.run([sys.executable, "-c", script], env=_env(tmp_path), capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    _runs_after(tmp_path, "all")
