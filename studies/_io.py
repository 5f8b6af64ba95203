"""What every study shares: its command-line flags, and writing / reading its results.

A study's results are one ``xr.Dataset`` or a ``{group: Dataset}`` dict; :func:`save` validates
them against :mod:`toymodels.schema` and writes ``<out>/<name>.nc`` (a dict as netCDF groups) with
the root attribute ``study = <name>``, so that ``python -m studies plot FILE.nc`` finds the study
that draws it; :func:`load` reads them back in the same form.
"""

from __future__ import annotations

import argparse
import os
import re
import time

import xarray as xr

from toymodels import resume
from toymodels.schema import validate

__all__ = ["SCALES", "description", "parser", "scale_of", "command", "save", "publish", "load", "settings_tag"]

SCALES = ("quick", "default", "full")


def description(doc: str) -> str:
    """The first paragraph of a module docstring ``doc`` on one line (whitespace runs joined into one
    space): a study's ``-h`` description, whole sentences rather than the docstring's first line."""
    first = re.split(r"\n\s*\n", doc.strip(), maxsplit=1)[0]
    return " ".join(first.split())


def parser(doc: str, *, scheduler: bool = False) -> argparse.ArgumentParser:
    """The flags every study takes: ``--quick`` / ``--full`` (default: the reduced scale), ``--out``,
    ``--no-progress``, and ``--scheduler`` for studies whose tasks can run on dask.  The description
    is the first paragraph of ``doc`` (:func:`description`)."""
    p = argparse.ArgumentParser(description=description(doc))
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="smallest scale (seconds to a few minutes on a CPU)")
    g.add_argument("--full", action="store_true", help="the papers' scale (long)")
    p.add_argument("--out", default="results", help="output folder (default: results)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    if scheduler:
        p.add_argument("--scheduler", default=None,
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
    """``(study name, result)`` from a file written by :func:`save`."""
    import netCDF4

    try:
        with netCDF4.Dataset(path) as nc:
            groups = list(nc.groups)
            name = getattr(nc, "study", None)
    except OSError as err:  # missing, truncated, not netCDF
        raise ValueError(f"{path} cannot be read as a study's results file ({err}).") from None
    if name is None:
        raise ValueError(f"{path} has no `study` attribute: it was not written by a study.")
    if not groups:
        return name, xr.load_dataset(path)
    return name, {g: xr.load_dataset(path, group=g) for g in groups}
