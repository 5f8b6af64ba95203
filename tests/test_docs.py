"""The documentation: papers cited by name (not by our own file names), a docstring on every public
object, whole-sentence ``-h`` descriptions, and the Sphinx API reference building without warnings.

The Sphinx build (``docs/api``) is skipped when sphinx is not installed (``pip install -e ".[docs]"``).
"""

from __future__ import annotations

import importlib
import inspect
import pathlib
import pkgutil
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("toymodels", "deepmodels", "studies")

# references to files outside the repository: the seed papers by number, their folder, the first
# design note; cite the paper (authors, year, title, section) and docs/architecture.md instead
FORBIDDEN = re.compile(r"seeds?[\s`(,]*00\d|seeds/|DESIGN\.md|\.\./shared")


def _text_files():
    skip = {"build", "_build", "results", "venv"}
    for path in sorted(ROOT.rglob("*")):
        rel = path.relative_to(ROOT)
        if path.suffix not in (".py", ".md", ".rst") or not path.is_file():
            continue
        if any(part in skip or part.startswith(".") or part.endswith(".egg-info") for part in rel.parts):
            continue
        if rel == pathlib.Path(__file__).relative_to(ROOT):  # holds the pattern itself
            continue
        yield rel, path


def test_no_references_to_files_outside_the_repository():
    hits = []
    for rel, path in _text_files():
        text = path.read_text(encoding="utf-8")
        for m in FORBIDDEN.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            hits.append(f"{rel}:{line}: {m.group()!r}")
    assert not hits, "cite the paper instead of these:\n" + "\n".join(hits)


def test_the_pattern_finds_what_it_must():
    for bad in ("lecture seed 004", "(seed 002)", "seeds 000/001", "seed ``003_...``", "lecture seed\n004",
                "../shared/DESIGN.md", "/work/shared/seeds/004.txt"):
        assert FORBIDDEN.search(bad), bad
    for fine in ("seed 0", "seed=0", "seeds (0, 1, 2)", "over seeds", "seed 1"):
        assert not FORBIDDEN.search(fine), fine


# --------------------------------------------------------------------------------------------------
# a docstring on every public object
# --------------------------------------------------------------------------------------------------
def _public_modules():
    for pkg_name in PACKAGES:
        pkg = importlib.import_module(pkg_name)
        yield pkg
        for info in pkgutil.walk_packages(pkg.__path__, prefix=f"{pkg_name}."):
            if any(part.startswith("_") for part in info.name.split(".")):
                continue
            yield importlib.import_module(info.name)


def _own_doc(obj) -> str:
    """A class's own docstring (not a base class's, not the signature a dataclass makes up)."""
    doc = obj.__dict__.get("__doc__") or ""
    if getattr(obj, "__dataclass_fields__", None) is not None and doc.startswith(f"{obj.__name__}("):
        return ""
    return doc.strip()


def _members(cls):
    """Public methods and properties defined in ``cls`` itself (not inherited, not dunder)."""
    for name, attr in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(attr, (staticmethod, classmethod)):
            attr = attr.__func__
        if isinstance(attr, property) or inspect.isfunction(attr):
            yield name, attr


def undocumented():
    """Qualified names of the public objects without a docstring."""
    missing = []
    for module in _public_modules():
        if not (module.__doc__ or "").strip():
            missing.append(f"{module.__name__} (module)")
        for name, obj in vars(module).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if inspect.isclass(obj):
                if not _own_doc(obj):
                    missing.append(f"{module.__name__}.{name}")
                for member, attr in _members(obj):
                    # an override keeps the documented base method's docstring (as autodoc shows it)
                    if not (inspect.getdoc(getattr(obj, member, attr)) or "").strip():
                        missing.append(f"{module.__name__}.{name}.{member}")
            elif inspect.isfunction(obj) and not (obj.__doc__ or "").strip():
                missing.append(f"{module.__name__}.{name}")
    return missing


def test_every_public_object_has_a_docstring():
    missing = undocumented()
    assert not missing, f"{len(missing)} public objects without a docstring:\n" + "\n".join(missing)


# --------------------------------------------------------------------------------------------------
# the command line's -h texts
# --------------------------------------------------------------------------------------------------
def test_every_study_describes_itself_in_whole_sentences():
    from studies import STUDIES
    from studies._io import parser

    for name in STUDIES:
        module = importlib.import_module(f"studies.{name}")
        text = parser(module.__doc__).description
        assert text.endswith((".", "?", ")")), f"{name}: {text[-60:]!r}"
        assert "seed 00" not in text, name
        assert "\n" not in text and "  " not in text, name
        assert len(text) > 40, name


def test_gallery_help_runs():
    out = subprocess.run([sys.executable, "-m", "studies", "-h"], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "The study gallery's command line." in out.stdout


# --------------------------------------------------------------------------------------------------
# the API reference
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_api_reference_builds_without_warnings(tmp_path):
    pytest.importorskip("sphinx")
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", "-d", str(tmp_path / "doctrees"),
           str(ROOT / "docs" / "api"), str(tmp_path / "html")]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert out.returncode == 0, out.stderr[-5000:]
    assert (tmp_path / "html" / "index.html").exists()
