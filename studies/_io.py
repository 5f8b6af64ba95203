"""What every study shares: its command-line flags, and writing / reading its results.

A study's results are one ``xr.Dataset`` or a ``{group: Dataset}`` dict; :func:`save` validates
them against :mod:`toymodels.schema` and writes ``<out>/<name>.nc`` (a dict as netCDF groups) with
the root attribute ``study = <name>``, so that ``python -m studies plot FILE.nc`` finds the study
that draws it; :func:`load` reads them back in the same form.

User errors on the command line (a bad flag or flag value, an unknown study, a file that is missing,
unreadable or not a study's results) are one line on stderr, ``python -m studies: error: ...``, and
exit status 2 (argparse's convention): :class:`ArgumentParser` for the flags, :class:`UsageError`
for the rest, caught by :func:`studies.__main__.main`.  Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import re
import time

import xarray as xr

from toymodels import resume
from toymodels.schema import validate

__all__ = ["SCALES", "PROG", "description", "UsageError", "ArgumentParser", "parser", "scale_of", "command", "save", "publish",
           "load", "settings_tag", "error_exit", "out_folder", "scheduler_address", "positive_int", "fraction"]

SCALES = ("quick", "default", "full")
PROG = "python -m studies"


class UsageError(ValueError):
    """A mistake in what the user asked for (a study name, a file, a flag value): the command line
    reports it as one line ``python -m studies: error: ...`` with exit status 2."""


def error_exit(message):
    """Print ``python -m studies: error: <message>`` (one line) on stderr and exit with status 2."""
    import sys

    one_line = " ".join(str(message).split())
    sys.stderr.write(f"{PROG}: error: {one_line}\n")
    raise SystemExit(2)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: a bad flag or flag value is ``python -m studies: error: ...``
    on stderr and exit status 2, without the usage block (``-h`` shows it)."""

    def error(self, message):
        import re

        message = re.sub(r"^argument ([^:]+): must be", r"`\1` must be", message)  # a flag value: the usual wording
        error_exit(f"{message} (see `{self.prog} -h`).")


def _flag_type(convert, name):
    """An argparse ``type`` from a converter that raises ``ValueError`` / ``TypeError`` with the
    message to show (argparse then reports ``argument --flag: <message>``)."""
    def parse(text):
        try:
            return convert(text)
        except (TypeError, ValueError) as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    parse.__name__ = name
    return parse


def _out_folder(text: str) -> str:
    if not text:
        raise ValueError("must be a folder; got ''")
    if os.path.exists(text) and not os.path.isdir(text):
        raise ValueError(f"must be a folder; got {text!r}, an existing file")
    return text


def _scheduler(text: str) -> str:
    if text != "local" and ":" not in text:
        raise ValueError(f"must be 'local' or a dask scheduler address such as tcp://host:8786; got {text!r}")
    return text


def _number(convert, what, ok):
    """A flag-value converter: ``convert(text)`` (``int`` or ``float``), accepted when ``ok(value)``;
    otherwise "must be <what>; got ..."."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise ValueError(f"must be {what}; got {text!r}") from None
        if not ok(value):
            raise ValueError(f"must be {what}; got {value}")
        return value

    return parse


_positive_int = _number(int, "an integer >= 1", lambda v: v >= 1)
_fraction = _number(float, "a number in (0, 1)", lambda v: 0.0 < v < 1.0)


out_folder = _flag_type(_out_folder, "folder")
scheduler_address = _flag_type(_scheduler, "scheduler")
positive_int = _flag_type(_positive_int, "positive integer")
fraction = _flag_type(_fraction, "fraction")


def description(doc: str) -> str:
    """The first paragraph of a module docstring ``doc`` on one line (whitespace runs joined into one
    space): a study's ``-h`` description, whole sentences rather than the docstring's first line."""
    first = re.split(r"\n\s*\n", doc.strip(), maxsplit=1)[0]
    return " ".join(first.split())


def parser(doc: str, *, scheduler: bool = False) -> argparse.ArgumentParser:
    """The flags every study takes: ``--quick`` / ``--full`` (default: the reduced scale), ``--out``,
    ``--no-progress``, and ``--scheduler`` for studies whose tasks can run on dask.  The description
    is the first paragraph of ``doc`` (:func:`description`); errors are one line with exit status 2
    (:class:`ArgumentParser`)."""
    p = ArgumentParser(description=description(doc))
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="smallest scale (seconds to a few minutes on a CPU)")
    g.add_argument("--full", action="store_true", help="the papers' scale (long)")
    p.add_argument("--out", default="results", type=out_folder, help="output folder (default: results)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    if scheduler:
        p.add_argument("--scheduler", default=None, type=scheduler_address,
                       help="run the independent tasks on dask: 'local' (a LocalCluster) or a scheduler address")
    return p


def settings_tag(scale: str, cfg: dict) -> str:
    """``<scale>-<hash of the settings>``, the prefix of a study's resume files: a rerun after a
    change of the scale's settings computes afresh instead of reusing points of the old ones."""
    import hashlib

    return f"{scale}-{hashlib.sha1(repr(sorted(cfg.items())).encode()).hexdigest()[:8]}"


def scale_of(args) -> str:
    """The scale the parsed flags choose: ``"quick"``, ``"full"`` or ``"default"``."""
    return "quick" if args.quick else "full" if args.full else "default"


def command(doc: str, run, name: str, argv=None, *, summary=None, scheduler: bool = False):
    """The body of a study's ``main``: parse the shared flags, run, print ``summary(result)`` (a
    string) and what was written.  Returns the result."""
    a = parser(doc, scheduler=scheduler).parse_args(argv)
    t0 = time.perf_counter()
    kwargs = dict(scale=scale_of(a), out=a.out, progress=not a.no_progress)
    if scheduler:
        kwargs["scheduler"] = a.scheduler
    result = run(**kwargs)
    if summary is not None:
        print(summary(result))
    print(f"wrote {a.out}/{name}.nc and .png in {time.perf_counter() - t0:.1f} s")
    return result


def save(result, out: str, name: str) -> str:
    """Validate and write ``result`` (a Dataset or ``{group: Dataset}``) to ``<out>/<name>.nc``,
    atomically (:func:`toymodels.resume.write`: an interrupt leaves the old file or the new one)."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"{name}.nc")
    if isinstance(result, xr.Dataset):
        validate(result)
        ds = result.copy()
        ds.attrs["study"] = name
        return resume.write(ds, path)
    for ds in result.values():
        validate(ds)
    return resume.write({"": xr.Dataset(attrs={"study": name}), **result}, path)


def publish(result, out: str, name: str, plot):
    """:func:`save` the results, draw ``plot(result, <out>/<name>.png)``, return the results."""
    save(result, out, name)
    plot(result, os.path.join(out, f"{name}.png"))
    return result


def load(path: str):
    """``(study name, result)`` from a file written by :func:`save`.

    Raises:
        UsageError: (a ``ValueError``) the file is missing, unreadable, not netCDF, or has no
            ``study`` attribute (not written by a study).
    """
    import netCDF4

    if not os.path.exists(path):
        raise UsageError(f"{path} does not exist.")
    if os.path.isdir(path):
        raise UsageError(f"{path} is a folder, not a study's results file (a .nc file).")
    try:
        with netCDF4.Dataset(path) as nc:
            groups = list(nc.groups)
            name = getattr(nc, "study", None)
        if name is not None:
            result = (xr.load_dataset(path) if not groups else
                      {g: xr.load_dataset(path, group=g) for g in groups})
    except OSError as err:  # unreadable, truncated, not netCDF
        raise UsageError(f"{path} cannot be read as a study's results file ({err}).") from None
    if name is None:
        raise UsageError(f"{path} has no `study` attribute: it was not written by a study.")
    return name, result
