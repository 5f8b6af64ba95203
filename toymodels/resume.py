"""Files that let long work resume: written whole or not at all, read back only when whole and of
the same settings.

Every file the library writes to resume from (a study's points, a sweep's part file, a training
run's results and checkpoint, a measured run) goes through :func:`write`: the data go to a
temporary name beside the target (unique per process and call), are flushed to disk, and replace
the target in one ``os.replace``.  An interrupt (Ctrl-C, SIGKILL, a full disk) leaves either the old
file or the new one, never a half-written one, and two runs writing into one folder never open the
same file (the last complete write wins; both are results of the same settings).

:func:`read` is the other half: a file that is missing returns ``None``; one that cannot be read, is
incomplete, holds NaN where :mod:`toymodels.schema` forbids it, or was written for other settings
returns ``None`` with a :class:`ResumeWarning` naming the file and the reason, and the caller
recomputes it (the file is overwritten by the next :func:`write`).  It never raises on a bad file and
never hands back a file of other settings.
"""

from __future__ import annotations

import math
import os
import threading
import uuid
import warnings

import numpy as np
import xarray as xr

__all__ = ["ResumeWarning", "write", "read", "write_array", "read_array", "same_settings", "replace_atomically",
           "NETCDF_LOCK"]

NETCDF_LOCK = threading.RLock()
"""netCDF4 / HDF5 calls are not thread-safe: every read and write here holds this lock."""


class ResumeWarning(UserWarning):
    """A resume file was ignored (unreadable, incomplete or of other settings) and is recomputed."""


def _tmp_name(path: str) -> str:
    head, tail = os.path.split(os.fspath(path))
    return os.path.join(head, f".{tail}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _remove_stale_temporaries(path: str, min_age_s: float = 600.0):
    """Remove temporaries of ``path`` left by killed writers: their process is gone (on this host)
    and they are older than ``min_age_s`` (a writer on another host of a shared folder is alive
    with a PID we cannot see; it finishes or dies long before that)."""
    import glob
    import time

    head, tail = os.path.split(path)
    for tmp in glob.glob(os.path.join(glob.escape(head), f".{glob.escape(tail)}.tmp-*")):
        try:
            pid = int(tmp.rsplit(".tmp-", 1)[1].split("-")[0])
            if time.time() - os.path.getmtime(tmp) < min_age_s:
                continue
            os.kill(pid, 0)
        except ProcessLookupError:
            try:
                os.remove(tmp)
            except OSError:
                pass
        except (ValueError, OSError):
            continue


def replace_atomically(path, write_to) -> str:
    """Call ``write_to(tmp)`` for a temporary name beside ``path``, flush it to disk and rename it
    onto ``path``; the temporary file is removed if anything fails.  Returns ``path``."""
    path = os.fspath(path)
    tmp = _tmp_name(path)
    try:
        write_to(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _remove_stale_temporaries(path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    return path


def write(data, path) -> str:
    """Write a Dataset, or ``{group: Dataset}`` as netCDF groups (root attrs from ``attrs`` of an
    optional ``""`` entry), to ``path`` atomically (see the module docstring).  Returns ``path``."""

    def to(tmp):
        with NETCDF_LOCK:
            if isinstance(data, xr.Dataset):
                data.to_netcdf(tmp)
                return
            root = data.get("", xr.Dataset())
            root.to_netcdf(tmp, mode="w")
            for group, ds in data.items():
                if group != "":
                    ds.to_netcdf(tmp, group=group, mode="a")

    return replace_atomically(path, to)


def same_settings(attrs: dict, settings: dict) -> tuple[bool, str]:
    """Whether ``attrs`` (a saved file's) hold every entry of ``settings`` with the same value:
    strings compare as strings, numbers as floats (NaN equals NaN).  Returns ``(same, why_not)``."""
    for key, want in settings.items():
        if key not in attrs:
            return False, f"it has no `{key}` attribute"
        have = attrs[key]
        if isinstance(want, str) or isinstance(have, str):
            ok = str(have) == str(want)
        else:
            try:
                a, b = float(have), float(want)
            except (TypeError, ValueError):
                ok = False
            else:
                ok = a == b or (math.isnan(a) and math.isnan(b))
        if not ok:
            show = lambda v: repr(v.item() if isinstance(v, np.generic) else v)  # noqa: E731
            return False, f"`{key}` is {show(have)} there and {show(want)} here"
    return True, ""


def _ignored(path, why: str):
    warnings.warn(f"ignoring resume file {path}: {why}; recomputing it.", ResumeWarning, stacklevel=3)
    return None


def read(path, *, settings: dict | None = None, variables=(), groups=None, prefix: dict | None = None, check=None):
    """The saved Dataset (or ``{group: Dataset}`` when ``groups`` names them) at ``path``, or
    ``None`` when it must be recomputed.

    Args:
        path: the file; a missing file returns ``None`` silently.
        settings: attributes the file must carry with these values (see :func:`same_settings`).
        variables: data variables the file must hold (in every group).
        groups: netCDF groups to read; each must be present.
        prefix: ``{coordinate: values}`` the file's coordinate must agree with on their common
            length (a run over a longer or shorter grid resumes; one over another grid does not).
        check: optional ``check(result)`` raising ``ValueError`` when the content is unusable.

    A file that fails any of these is reported with a :class:`ResumeWarning` naming it and why.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        return None
    try:
        with NETCDF_LOCK:
            if groups is None:
                result = xr.load_dataset(path)
                parts = {"": result}
            else:
                result = {g: xr.load_dataset(path, group=g) for g in groups}
                parts = result
                result[""] = xr.load_dataset(path)
    except Exception as err:  # truncated, empty, garbage, a group missing: all mean "recompute"
        return _ignored(path, f"it cannot be read ({type(err).__name__}: {err})")
    root = parts[""]
    if settings:
        same, why = same_settings(root.attrs, settings)
        if not same:
            return _ignored(path, f"it was written for other settings ({why})")
    for coord, values in (prefix or {}).items():
        saved = root[coord].values if coord in root.coords else np.array([])
        n = min(saved.size, len(values))
        if coord not in root.coords or not np.array_equal(saved[:n], np.asarray(values)[:n]):
            return _ignored(path, f"it was written for another grid of `{coord}` ({saved[:n]} there, "
                                  f"{np.asarray(values)[:n]} here)")
    from .schema import NO_NAN

    for name, ds in parts.items():
        if name == "" and groups is not None:
            continue
        missing = [v for v in variables if v not in ds]
        if missing:
            return _ignored(path, f"it lacks {', '.join(missing)}")
        for v, var in ds.data_vars.items():
            if v in NO_NAN and var.dtype.kind == "f" and np.any(np.isnan(var.values)):
                return _ignored(path, f"`{v}` holds NaN")
    if check is not None:
        try:
            check(result)
        except ValueError as err:
            return _ignored(path, str(err))
    if groups is not None:
        result.pop("", None)
    return result


def write_array(array, path) -> str:
    """Write one numpy array to ``path`` (``.npy`` format) atomically."""

    def to(tmp):
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(array))

    return replace_atomically(path, to)


def read_array(path, *, shape=None, dtype=None):
    """The array saved at ``path``, or ``None`` (missing; or unreadable, or of another ``shape`` /
    ``dtype`` kind, with a :class:`ResumeWarning`)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        return None
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as err:
        return _ignored(path, f"it cannot be read ({type(err).__name__}: {err})")
    if shape is not None and arr.shape != tuple(shape):
        return _ignored(path, f"its shape is {arr.shape}, expected {tuple(shape)}")
    if dtype is not None and arr.dtype != np.dtype(dtype):
        return _ignored(path, f"its dtype is {arr.dtype}, expected {np.dtype(dtype)}")
    return arr
