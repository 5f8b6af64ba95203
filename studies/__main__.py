"""The study gallery's command line.

    python -m studies list                      # every study, one line each
    python -m studies run NAME [--quick | --full] [--out DIR] [--scheduler ADDRESS] [--no-progress]
    python -m studies plot FILE.nc [--out FILE.png]   # redraw from saved results, no recomputing

``python -m studies.NAME [flags]`` is the same as ``python -m studies run NAME [flags]``.

A user error (an unknown study or flag, a bad flag value, a file that is missing, unreadable or not a
study's results) is one line on stderr, ``python -m studies: error: ...``, with exit status 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import os
import sys

from . import STUDIES
from ._io import PROG, ArgumentParser, UsageError, error_exit


def _module(name, where=""):
    if name not in STUDIES:
        raise UsageError(f"unknown study {name!r}{where}; known: {', '.join(STUDIES)} ({PROG} list).")
    return importlib.import_module(f"studies.{name}")


def main(argv=None):
    """Run the command line on ``argv`` (default ``sys.argv[1:]``); user errors exit with status 2
    after one line on stderr (see the module docstring)."""
    try:
        return _main(sys.argv[1:] if argv is None else list(argv))
    except UsageError as err:
        error_exit(err)


def _main(argv):
    # the docstring's first paragraph on one line (as studies._io.description, without importing the models)
    p = ArgumentParser(prog=PROG, description=" ".join(__doc__.split("\n\n")[0].split()),
                       epilog=f"`{PROG} list` shows the studies; `{PROG} run NAME -h` shows a study's flags.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the studies", description="List the studies, one line each.")
    r = sub.add_parser("run", help="run a study (the flags after NAME go to the study; NAME -h lists them)",
                       description="Run a study and write its results (NAME.nc) and figure (NAME.png); the flags "
                                   f"after NAME go to the study, and `{PROG} run NAME -h` lists them.")
    r.add_argument("name", help=f"a study from `{PROG} list`; `run NAME -h` shows its flags")
    pl = sub.add_parser("plot", help="redraw a study's figure from its netCDF file",
                        description="Redraw a study's figure from the netCDF file it wrote, without recomputing.")
    pl.add_argument("file", help="a study's results file (e.g. results/NAME.nc)")
    pl.add_argument("--out", default=None, help="PNG to write (default: FILE with .png)")
    if argv[:1] == ["run"] and len(argv) >= 2 and not argv[1].startswith("-"):  # the rest belongs to the study
        module = _module(argv[1])
        sys.argv[0] = f"{PROG} run {argv[1]}"  # the study's --help names the command
        return module.main(argv[2:])
    a = p.parse_args(argv)
    if a.command == "list":
        width = max(map(len, STUDIES))
        for name, what in STUDIES.items():
            print(f"{name:{width}s}  {what}")
        return None
    if a.command == "run":
        return _module(a.name).main([])
    from ._io import load

    out = a.out or os.path.splitext(a.file)[0] + ".png"
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise UsageError(f"the folder of --out {out!r} does not exist ({folder}).")
    name, result = load(a.file)
    _module(name, f" in the `study` attribute of {a.file}").plot(result, out)
    print(f"wrote {out}")
    return None


if __name__ == "__main__":
    main()
