"""`python -m studies`: a user error is one line on stderr, `python -m studies: error: ...`, and exit
status 2 (argparse's convention), never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import xarray as xr

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args, cwd):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "studies", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def _assert_one_line_error(out, *pieces):
    assert out.returncode == 2, out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("python -m studies: error: "), lines[0]
    assert "Traceback" not in out.stderr and out.stdout == ""
    for piece in pieces:
        assert piece in lines[0], lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    (folder / "notes.nc").write_text("not a netCDF file\n")
    xr.Dataset({"loss": ("step", [1.0])}).to_netcdf(folder / "other.nc")
    return folder


# through the real entry point (a new interpreter); the other error paths through `main` below
@pytest.mark.parametrize("args, pieces", [
    (("plot", "nosuch.nc"), ("nosuch.nc does not exist",)),
    (("run", "rate_vs_floor", "--bogus"), ("unrecognized arguments: --bogus",
                                            "python -m studies run rate_vs_floor -h")),
], ids=["plot-missing", "run-bad-flag"])
def test_user_errors_are_one_line_with_status_2(files, args, pieces):
    _assert_one_line_error(_cli(*args, cwd=files), *pieces)


def test_bad_flag_values_and_commands(files, capsys):
    """Flag values are checked before anything runs (one line each, status 2), as are the commands."""
    from studies.__main__ import main

    cases = [(["run", "batch_size_scaling", "--dim", "-3"], "`--dim` must be an integer >= 1; got -3"),
             (["run", "batch_size_scaling", "--target-fraction", "2"], "`--target-fraction` must be a number in (0, 1)"),
             (["run", "nqm_vs_cnn", "--scheduler", "nowhere"], "`--scheduler` must be 'local' or a dask scheduler"),
             (["run", "rate_vs_floor", "--out", str(files / "notes.nc")], "`--out` must be a folder"),
             (["run", "nqm_vs_cnn", "--network", "vgg"], "invalid choice: 'vgg'"),
             (["plot", str(files), ], "is a folder, not a study's results file"),
             (["plot", str(files / "other.nc"), "--out", str(files / "no" / "such" / "fig.png")], "does not exist"),
             (["nosuch"], "invalid choice: 'nosuch'"),
             ([], "the following arguments are required: command")]
    for argv, piece in cases:
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("python -m studies: error: ") and piece in err, err


def test_errors_through_main_are_one_line(files, capsys):
    from studies.__main__ import main

    for argv, piece in ((["plot", str(files / "nosuch.nc")], "nosuch.nc does not exist."),
                        (["plot", str(files / "notes.nc")], "notes.nc cannot be read as a study's results file"),
                        (["plot", str(files / "other.nc")],
                         "other.nc has no `study` attribute: it was not written by a study"),
                        (["run", "nosuch"], "unknown study 'nosuch'; known: batch_size_scaling"),
                        (["run", "batch_size_scaling", "--dim", "x"], "`--dim` must be an integer >= 1; got 'x'")):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("python -m studies: error: ") and piece in err, err


def test_a_study_attribute_naming_no_study(files, capsys):
    from studies.__main__ import main

    xr.Dataset({"loss": ("step", [1.0])}, attrs={"study": "gone"}).to_netcdf(files / "gone.nc")
    with pytest.raises(SystemExit) as info:
        main(["plot", str(files / "gone.nc")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m studies: error: unknown study 'gone' in the `study` attribute of ")
