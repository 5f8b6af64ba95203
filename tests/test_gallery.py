"""Smoke test of the study gallery: every study runs with --quick through the command line and
writes a figure and a netCDF file that passes the schema validator and redraws from disk."""

import pytest

from studies import STUDIES
from studies._io import load
from studies.__main__ import main
from toymodels.schema import validate


# the two studies that train many networks take minutes even at --quick on a 2-core CPU: the default
# suite runs them at their tiny test scale (test_coherent_study.py, test_studies.py), and
# gradient_tails at --quick in test_gradient_tails_study.py; transformer_noise starts DDP processes (its
# tiny run is test_studies.py's, also slow; test_distributed.py covers DDP, slow, in CI); their command-line
# runs are -m slow; deep_bootstrap's --quick generates 7400 MNIST-1D examples (about a minute on a loaded CPU;
# its tiny run is test_studies.py's, by default); optimizer_zoo's --quick tunes schedule-free SGD update by
# update on a coarsened NQM (its default checks are test_optimizer_zoo_study.py's); scaling_laws takes about a minute
# at --quick (its tiny run is test_studies.py's, slow)
SLOW = {"nqm_vs_cnn", "coherent_gradients", "gradient_tails", "theory_vs_practice", "transformer_noise",
        "deep_bootstrap", "optimizer_zoo", "scaling_laws"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in STUDIES])
def test_every_study_runs_quick_and_writes_valid_files(name, tmp_path, quick_study):
    out = quick_study(name)  # python -m studies run NAME --quick (shared with the study's own tests)
    ncs = [p for p in out.glob("*.nc")]
    pngs = [p for p in out.glob("*.png")]
    assert ncs and pngs
    for nc in ncs:
        study, result = load(str(nc))
        assert study in STUDIES
        for ds in ([result] if not isinstance(result, dict) else result.values()):
            validate(ds)
        redrawn = tmp_path / f"redrawn_{nc.stem}.png"
        main(["plot", str(nc), "--out", str(redrawn)])
        assert redrawn.stat().st_size > 10_000
    assert all(p.stat().st_size > 10_000 for p in pngs)
