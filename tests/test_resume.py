"""Nothing lost: resume files written whole or not at all, damaged or foreign ones recomputed.

Interrupts are real: a subprocess is SIGKILLed *during* a write (its ``to_netcdf`` has just written
half a file), and the rerun must give exactly the result of an uninterrupted run.  Damaged files
(truncated, empty, garbage, NaN) and files of other settings are recomputed with a
:class:`toymodels.resume.ResumeWarning` naming them.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from toymodels import NQM, resume
from toymodels.resume import ResumeWarning
from toymodels.sweep import batch_size_sweep

ROOT = Path(__file__).resolve().parents[1]

# SIGKILL the process in the middle of its n-th netCDF write: the file it was writing is left half
# written (truncated), as a kill during the write leaves it
KILL_DURING_WRITE = """
import os, signal
import xarray as xr
_orig, _calls = xr.Dataset.to_netcdf, [0]
def _to_netcdf(self, path=None, *args, **kwargs):
    out = _orig(self, path, *args, **kwargs)
    if path is not None and not kwargs.get("group"):
        _calls[0] += 1
        if _calls[0] == {n}:
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
            os.kill(os.getpid(), signal.SIGKILL)
    return out
xr.Dataset.to_netcdf = _to_netcdf
"""


def _child_env() -> dict:
    """The environment of a child process that must compute what this one computes bit for bit: this
    package first on the path, and torch's thread count (float32 sums split over another number of
    threads differ in the last bits; an earlier test of the session may have changed it with
    ``torch.set_num_threads``).  The rest of the environment is this process's: nothing may leave
    thread variables in it (a dask LocalCluster's nanny did: ``MKL_NUM_THREADS=1`` there made the
    children's BLAS single-threaded, see :func:`toymodels.parallel.local_cluster`)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    if "torch" in sys.modules:
        env["OMP_NUM_THREADS"] = str(sys.modules["torch"].get_num_threads())
    return env


def _run_killed(body: str, n: int, cwd=None):
    script = KILL_DURING_WRITE.format(n=n) + textwrap.dedent(body)
    env = _child_env()
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600,
                         cwd=cwd)
    assert out.returncode == -9, f"the process was not killed during write {n}:\n{out.stderr[-2000:]}"


def _assert_same(a: xr.Dataset, b: xr.Dataset):
    xr.testing.assert_identical(a.drop_attrs(), b.drop_attrs())


# ----------------------------------------------------------------------------------------- module
def test_write_is_atomic_and_read_reports_damage(tmp_path):
    path = tmp_path / "x.nc"
    ds = xr.Dataset({"loss": ("step", [1.0, 0.5])}, coords={"step": [0, 1]}, attrs={"target": 0.1})
    resume.write(ds, path)
    assert [p.name for p in tmp_path.iterdir()] == ["x.nc"]  # no temporary left behind
    _assert_same(resume.read(path, settings={"target": 0.1}), ds)
    assert resume.read(tmp_path / "missing.nc") is None
    with pytest.warns(ResumeWarning, match=r"x\.nc.*other settings \(`target` is 0\.1 there and 0\.2 here\)"):
        assert resume.read(path, settings={"target": 0.2}) is None
    _assert_same(resume.read(path, prefix={"step": [0, 1, 2]}), ds)  # a longer grid with the same start
    with pytest.warns(ResumeWarning, match=r"x\.nc: it was written for another grid of `step`"):
        assert resume.read(path, prefix={"step": [0, 2]}) is None
    with pytest.warns(ResumeWarning, match=r"x\.nc.*lacks grad_var"):
        assert resume.read(path, variables=("grad_var",)) is None
    for damage in (b"", b"garbage" * 10, path.read_bytes()[:48]):
        path.write_bytes(damage)
        with pytest.warns(ResumeWarning, match=r"ignoring resume file .*x\.nc: it cannot be read"):
            assert resume.read(path) is None
    resume.write(ds.assign(loss=("step", [np.nan, np.nan])), path)  # what a SIGINT left before
    with pytest.warns(ResumeWarning, match=r"`loss` holds NaN"):
        assert resume.read(path) is None


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "x.nc"
    good = xr.Dataset({"loss": ("step", [1.0])}, coords={"step": [0]})
    resume.write(good, path)

    def broken(tmp):
        Path(tmp).write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        resume.replace_atomically(path, broken)
    _assert_same(resume.read(path), good)
    assert [p.name for p in tmp_path.iterdir()] == ["x.nc"]


# ------------------------------------------------------------------------------------------ sweep
SWEEP = """
from toymodels import NQM
from toymodels.sweep import batch_size_sweep
batch_size_sweep(NQM.power_law(100), "sgd", [1, 2, 4, 8, 16], 0.05 * NQM.power_law(100).initial_loss,
                 path={path!r}, progress=False)
"""


def _sweep(path=None):
    nqm = NQM.power_law(100)
    return batch_size_sweep(nqm, "sgd", [1, 2, 4, 8, 16], 0.05 * nqm.initial_loss, path=path, progress=False)


def test_sweep_killed_during_a_write_resumes_to_the_same_result(tmp_path):
    path = tmp_path / "sgd.nc"
    _run_killed(SWEEP.format(path=str(path)), n=3)
    resumed = _sweep(path)  # the file holds 2 batch sizes: no warning, 3 recomputed
    _assert_same(resumed, _sweep())
    _assert_same(resume.read(path), resumed)


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "other target"])
def test_sweep_recomputes_a_damaged_or_foreign_file(tmp_path, damage):
    path = tmp_path / "sgd.nc"
    straight = _sweep(path)
    if damage == "other target":
        nqm = NQM.power_law(100)
        with pytest.warns(ResumeWarning, match=r"sgd\.nc.*other settings"):
            batch_size_sweep(nqm, "sgd", [1, 2], 0.2 * nqm.initial_loss, path=path, progress=False)
    else:
        path.write_bytes({"truncated": path.read_bytes()[:48], "empty": b"", "garbage": b"\x00garbage" * 50}[damage])
    with pytest.warns(ResumeWarning, match=r"sgd\.nc"):
        again = _sweep(path)
    _assert_same(again, straight)


@pytest.mark.slow  # 4-8 s (two processes at once); CI runs it
def test_two_sweeps_into_one_file_at_once(tmp_path):
    path = tmp_path / "sgd.nc"
    env = _child_env()
    procs = [subprocess.Popen([sys.executable, "-c", SWEEP.format(path=str(path))], env=env, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    _assert_same(resume.read(path), _sweep())


# ------------------------------------------------------------------------------------------ study
@pytest.mark.slow  # 13 s (three quick studies and a killed process); CI runs it
def test_study_killed_during_a_point_write_resumes_to_the_same_result(tmp_path):
    from studies import rf_variance

    out = tmp_path / "killed"
    _run_killed(f"from studies import rf_variance\nrf_variance.run(scale='quick', out={str(out)!r}, progress=False)",
                n=3)
    points = sorted((out / "rf_variance_points").glob("*.nc"))
    assert len(points) == 2  # the third was being written: only its temporary is left, half written
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResumeWarning)  # complete files are reused without complaint
        resumed = rf_variance.run(scale="quick", out=str(out), progress=False)
    straight = rf_variance.run(scale="quick", out=str(tmp_path / "straight"), progress=False)
    _assert_same(resumed, straight)

    victim = points[0]
    victim.write_bytes(victim.read_bytes()[:48])  # what a SIGKILL left before the atomic writes
    with pytest.warns(ResumeWarning, match=victim.name):
        again = rf_variance.run(scale="quick", out=str(out), progress=False)
    _assert_same(again, straight)


# --------------------------------------------------------------------------------------- training
TRAIN = """
from deepmodels import data, models
from deepmodels import train as training
from deepmodels.train import train
training.RESULTS_EVERY_S = 0.0  # results after every probe, so write 3 is the probe at step 10's
train(models.mlp(64, 10, (16,), seed=3), data.digits(), lr=0.1, batch_size=8, n_steps=20,
      probe_at=[0, 5, 10, 15, 20], probe_size=32, path={path!r}, progress=False)
"""


def _train(path=None, **kw):
    import torch

    from deepmodels import data, models
    from deepmodels.train import train

    model = models.mlp(64, 10, (16,), seed=3)
    args = dict(lr=0.1, batch_size=8, n_steps=20, probe_at=[0, 5, 10, 15, 20], probe_size=32, path=path,
                progress=False)
    args.update(kw)
    ds = train(model, data.digits(), **args)
    return ds, torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.slow  # 9 s; the default suite kills training in test_training_writes_results_at_most_...; CI runs it
def test_training_killed_during_a_write_resumes_to_the_same_run(tmp_path):
    import torch

    path = tmp_path / "run.nc"
    _run_killed(TRAIN.format(path=str(path)), n=3)  # during the results write of the probe at step 10
    resumed, p_resumed = _train(path)
    straight, p_straight = _train()
    torch.testing.assert_close(p_resumed, p_straight, rtol=0, atol=0)
    _assert_same(resumed, straight)
    _assert_same(resume.read(path), straight)


@pytest.mark.slow  # ~9 s (trains with a checkpoint per probe); CI runs it
def test_training_writes_results_at_most_every_results_every_s(tmp_path, monkeypatch):
    """Checkpoint after every probe; the netCDF results only when RESULTS_EVERY_S has passed and at
    the end, and a run killed between two results writes resumes from its checkpoint."""
    import torch

    from deepmodels import train as training

    monkeypatch.setattr(training, "RESULTS_EVERY_S", math.inf)
    written = {"nc": 0, "pt": 0}
    orig_nc, orig_pt = resume.write, training._save_torch

    def count_nc(ds, path, *a, **k):
        written["nc"] += 1
        return orig_nc(ds, path, *a, **k)

    def count_pt(path, obj):
        written["pt"] += 1
        return orig_pt(path, obj)

    monkeypatch.setattr(resume, "write", count_nc)
    monkeypatch.setattr(training, "_save_torch", count_pt)
    path = tmp_path / "run.nc"
    ds, params = _train(path)
    assert written == {"nc": 2, "pt": 5}  # results at the first probe and the end; 5 probes' checkpoints
    _assert_same(resume.read(path), ds)
    # killed right after the checkpoint of the probe at step 10, its results file still of step 0:
    # the rerun resumes from the checkpoint to the same run
    killed = tmp_path / "killed.nc"
    body = """
import os, signal
from deepmodels import train as training
training.RESULTS_EVERY_S = float("inf")
_orig, _n = training._save_torch, [0]
def _save(path, obj):
    _orig(path, obj)
    _n[0] += 1
    if _n[0] == 3:
        os.kill(os.getpid(), signal.SIGKILL)
training._save_torch = _save
""" + TRAIN.replace("training.RESULTS_EVERY_S = 0.0", "").format(path=str(killed))
    env = _child_env()
    out = subprocess.run([sys.executable, "-c", body], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == -9, out.stderr[-2000:]
    assert list(resume.read(killed).step.values) == [0]
    resumed, p_resumed = _train(killed)
    torch.testing.assert_close(p_resumed, params, rtol=0, atol=0)
    _assert_same(resumed, ds)


@pytest.mark.slow  # 5-13 s (15 trainings); CI runs it
def test_training_with_other_settings_starts_afresh(tmp_path):
    path = tmp_path / "run.nc"
    _train(path)
    for change in (dict(lr=0.05), dict(batch_size=4), dict(n_steps=10, probe_at=[0, 5, 10]), dict(seed=1)):
        with pytest.warns(ResumeWarning, match=r"run\.nc\.pt"):
            again, _ = _train(path, **change)
        _assert_same(again, _train(**change)[0])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResumeWarning)
            _train(path)  # back to the first run (after a warning) for the next change
    ckpt = Path(str(path) + ".pt")
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    with pytest.warns(ResumeWarning, match=r"run\.nc\.pt: it cannot be read"):
        again, _ = _train(path)
    _assert_same(again, _train()[0])


def test_a_checkpoint_of_unnamed_layers_is_other_settings(tmp_path):
    """A checkpoint written before the models' layers had names (state_dict keys '0.weight', ...)
    holds the same parameters under other keys: it is of other settings (a fresh run with a
    ResumeWarning), never loaded into the named model."""
    import copy

    import torch

    from deepmodels import data, models
    from deepmodels.train import train

    unnamed = torch.nn.Sequential(*copy.deepcopy(models.mlp(64, 10, (16,), seed=3)).children())
    assert list(unnamed.state_dict())[0] == "0.weight"
    path = tmp_path / "run.nc"
    old = train(unnamed, data.digits(), lr=0.1, batch_size=8, n_steps=20, probe_at=[0, 5, 10, 15, 20], probe_size=32,
                path=path, progress=False)
    assert list(old.layer.values) == ["0", "2", "total"]
    with pytest.warns(ResumeWarning, match=r"run\.nc\.pt: it was written for other settings \(`initial_parameters`"):
        again, _ = _train(path)
    assert list(again.layer.values) == ["fc1", "out", "total"]
    _assert_same(again, _train()[0])


def test_training_divergence_is_reported(tmp_path):
    ds, params = _train(lr=1e6)
    k = ds.attrs["diverged_at"]
    assert "above 1000 x the initial training loss" in ds.attrs["divergence"] or "inf" in ds.attrs["divergence"]
    assert int(ds.step[-1]) == k and np.isinf(ds.loss.values[-1]) and np.isinf(ds.grad_norm_sq.values[-1]).all()
    assert np.all(np.isfinite(ds.loss.values[:-1]))
    # resumed from its file, the diverged run is returned as it was
    first, _ = _train(tmp_path / "d.nc", lr=1e6)
    again, _ = _train(tmp_path / "d.nc", lr=1e6)
    _assert_same(first, ds)
    _assert_same(again, ds)


def test_stale_temporaries_of_killed_writers_are_removed(tmp_path):
    path = tmp_path / "x.nc"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale, live = tmp_path / f".x.nc.tmp-{dead}-abcd1234", tmp_path / f".x.nc.tmp-{os.getpid()}-abcd1234"
    for f in (stale, live):
        f.write_bytes(b"half")
        os.utime(f, (0, 0))  # old enough
    resume.write(xr.Dataset({"loss": ("step", [1.0])}, coords={"step": [0]}), path)
    assert not stale.exists() and live.exists()  # a live writer's temporary is left alone


@pytest.mark.slow
def test_two_studies_into_one_folder_at_once(tmp_path):
    """The issue's case: two batch_size_scaling runs into one --out (PermissionError before)."""
    env = _child_env()
    cmd = [sys.executable, "-m", "studies", "run", "batch_size_scaling", "--quick", "--out", str(tmp_path / "a"),
           "--no-progress"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    errs = [p.communicate(timeout=1200)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    subprocess.run(cmd[:-3] + ["--out", str(tmp_path / "b"), "--no-progress"], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    from studies import _io

    _assert_same(_io.load(str(tmp_path / "a" / "batch_size_scaling.nc"))[1],
                 _io.load(str(tmp_path / "b" / "batch_size_scaling.nc"))[1])
