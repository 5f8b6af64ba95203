"""deepmodels.gns and deepmodels.probes under torch.distributed, DDP on 2 CPU processes (gloo).

GNS: with gradient accumulation over M = 2 micro-batches, the same estimates, step after step, as
one process that runs the same 4 micro-batches in a row (with DDP's gradients as bucket views too,
and given the bare module instead of the wrapper); processes that ran different numbers of
micro-batches are refused on every process (no hang); a step that one process skips
(GradientNoiseScale.skip) while the other updates completes on both.  Probes: probed_step and gradient_stats on
a DDP model equal one process on the concatenated global batch."""

from __future__ import annotations

import contextlib
import datetime
import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from deepmodels.gns import GradientNoiseScale
from processes import free_port, run_processes

WORLD, M, B, STEPS, LR = 2, 2, 4, 3, 0.2


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3))


def _data():
    """Per step, WORLD * M micro-batches of B examples: process r takes micro-batches r*M .. r*M+M-1."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(STEPS, WORLD * M, B, 6, generator=g), torch.randint(0, 3, (STEPS, WORLD * M, B), generator=g)


def _sgd_step(model):
    """Plain SGD by hand (torch.optim's first step imports torch._dynamo: seconds in every process)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(p.grad, alpha=-LR)
    model.zero_grad()


def _worker(rank, out_dir):
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        from torch.nn.parallel import DistributedDataParallel as DDP

        x, y = _data()
        out = {}
        for view in (False, True):  # DDP's default, and .grad as views into its all-reduce buckets
            ddp = DDP(_model(), gradient_as_bucket_view=view)
            rows, rows_bare = [], []
            # the DDP wrapper (all-reduce started in DDP's synchronizing backward) and the bare module
            # (the default process group, all-reduce in update) on the same run
            with GradientNoiseScale(ddp) as gns, GradientNoiseScale(ddp.module) as gns_bare:
                for step in range(STEPS):
                    for m in range(M):
                        j = rank * M + m
                        with ddp.no_sync() if m < M - 1 else contextlib.nullcontext():
                            (F.cross_entropy(ddp(x[step, j]), y[step, j]) / M).backward()
                    rows.append(gns.update(micro_batch_size=B).as_dict())
                    rows_bare.append(gns_bare.update(micro_batch_size=B).as_dict())
                    _sgd_step(ddp.module)
            out[view] = {"rows": rows, "rows_bare": rows_bare,
                         "params": [p.detach().clone() for p in ddp.module.parameters()]}
        # different numbers of micro-batches: rank 0 one backward, rank 1 two (one all-reduce each)
        with GradientNoiseScale(ddp) as gns:
            for m in range(rank + 1):
                with ddp.no_sync() if m < rank else contextlib.nullcontext():
                    F.cross_entropy(ddp(x[0, m]), y[0, m]).backward()
            try:
                gns.update(micro_batch_size=B)
                out["refused"] = ""
            except ValueError as err:
                out["refused"] = str(err)
        # skip() on process 0 while process 1 updates (the wrapper's all-reduce started in the backward
        # pass, the bare module's in update/skip): it joins, so nobody waits; then both update
        ddp.zero_grad()
        with GradientNoiseScale(ddp) as gns, GradientNoiseScale(ddp.module) as gns_bare:
            one_sided = []
            for step in range(2):
                for m in range(M):
                    j = rank * M + m
                    with ddp.no_sync() if m < M - 1 else contextlib.nullcontext():
                        (F.cross_entropy(ddp(x[step, j]), y[step, j]) / M).backward()
                for est in (gns, gns_bare):
                    if step == 0 and rank == 0:
                        est.skip()
                    else:
                        one_sided.append(est.update(micro_batch_size=B).as_dict())
                ddp.zero_grad()
            out["one_sided"] = one_sided
            out["ema_steps"] = (gns.ema.t, gns_bare.ema.t)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _single_process():
    model = _model()
    x, y = _data()
    n = WORLD * M
    rows = []
    with GradientNoiseScale(model) as gns:
        for step in range(STEPS):
            for j in range(n):
                (F.cross_entropy(model(x[step, j]), y[step, j]) / n).backward()
            rows.append(gns.update(micro_batch_size=B).as_dict())
            _sgd_step(model)
    return rows, list(model.parameters())


@pytest.mark.slow  # 9-15 s (two spawned gloo processes); CI runs it, and the DDP studies/callbacks tests
def test_ddp_equals_single_process(tmp_path, monkeypatch):
    ref_rows, ref_params = _single_process()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    run_processes(_worker, (str(tmp_path),), WORLD)  # spawned, with a deadline (tests/processes.py)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for view in (False, True):
        runs = [g[view] for g in got]
        assert runs[0]["rows"] == runs[1]["rows"]  # every process reports the same numbers
        for run in runs:
            for row, bare in zip(run["rows"], run["rows_bare"]):
                assert row == pytest.approx(bare, rel=1e-12)
        for step, (row, ref) in enumerate(zip(runs[0]["rows"], ref_rows)):
            assert row["batch_size"] == WORLD * M * B and row["n_micro_batches"] == WORLD * M
            for k, v in ref.items():
                # float32 gradients summed in another order; the estimates are differences of O(1) norms
                assert row[k] == pytest.approx(v, rel=1e-4, abs=1e-6 * abs(ref["grad_norm_sq_micro"])), (view, step, k)
        for p, q in zip(runs[0]["params"], ref_params):
            torch.testing.assert_close(p, q.detach())
    for r in range(WORLD):
        assert "same number of backward passes on every process" in got[r]["refused"]
    # one-sided skip: process 0 left step 0 out (its EMA has one step), process 1 did not; step 1's
    # own estimates agree on both processes and between the wrapper and the bare module
    assert got[0]["ema_steps"] == (1, 1) and got[1]["ema_steps"] == (2, 2)
    last = [got[0]["one_sided"][-2:], got[1]["one_sided"][-2:]]
    for k in ("grad_norm_sq_micro", "grad_norm_sq_step", "trace_cov", "noise_scale_unbiased"):
        values = [row[k] for rows in last for row in rows]
        assert values == pytest.approx([values[0]] * 4, rel=1e-6), k
    assert all(row["n_micro_batches"] == WORLD * M for rows in last for row in rows)


# --------------------------------------------------------------------------------------------------
# deepmodels.probes under DDP: each process measures its own examples, one all-reduce of the sums
# --------------------------------------------------------------------------------------------------
PB = 4  # examples per process in the probe test (the global batch: WORLD * PB)


def _probe_data():
    """Token ids (WORLD * PB, T + 1) for the float64 TinyGPT, and float32 (x, y) for an MLP."""
    from test_fastpath_layers import _ids

    g = torch.Generator().manual_seed(5)
    return _ids(seed=3, batch=WORLD * PB), torch.randn(WORLD * PB, 6, generator=g), torch.randint(0, 3, (WORLD * PB,),
                                                                                                  generator=g)


def _probe_run(model, rows, *, ids=None, x=None, y=None):
    """Two probed steps (with, then without the standard error's deviations; SGD) and one
    gradient_stats on the examples ``rows``: the statistics as plain dicts, the coverage and B."""
    from deepmodels import pergrad, probes

    kw = {"batch": ids[rows]} if ids is not None else {"x": x[rows], "y": y[rows]}
    loss_fn = pergrad.next_token_loss if ids is not None else F.cross_entropy
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    out = []
    for step, sem in enumerate((True, False)):
        _, m = probes.probed_step(model, loss_fn, optimizer=opt, step=step, sem=sem, **kw)
        assert m.diverged is None, m.diverged
        out.append(({k: v.tolist() for k, v in m.variables().items()}, m.layer, int(m.n_examples), m.coverage))
    ds = probes.gradient_stats(model, loss_fn, **kw)
    out.append(({k: ds[k].values.tolist() for k in ds.data_vars}, [str(v) for v in ds.layer.values], int(ds.attrs["n_examples"]),
                {k: str(ds.attrs[k]) for k in ("method", "path_hooks", "path_func", "skipped")}))
    return out


def _probe_worker(rank, out_dir):
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        from torch.nn.parallel import DistributedDataParallel as DDP
        from test_fastpath_layers import TinyGPT

        from deepmodels import models, probes

        ids, x, y = _probe_data()
        mine = slice(rank * PB, (rank + 1) * PB)
        out = {"gpt": _probe_run(DDP(TinyGPT()), mine, ids=ids),
               "mlp": _probe_run(DDP(models.mlp(6, 3, (10,), seed=0)), mine, x=x, y=y)}
        # refused: inside no_sync (gradients not all-reduced), the torch.func method, bootstrap intervals
        ddp = DDP(models.mlp(6, 3, (10,), seed=0))
        opt = torch.optim.SGD(ddp.parameters(), lr=LR)
        errors = []
        with ddp.no_sync():
            for call in (lambda: probes.probed_step(ddp, F.cross_entropy, x[mine], y[mine], opt),
                         lambda: probes.gradient_stats(ddp, F.cross_entropy, x[mine], y[mine])):
                with pytest.raises(ValueError, match="no_sync") as err:
                    call()
                errors.append(str(err.value))
        for kw in ({"method": "func"}, {"ci": 0.9}):
            with pytest.raises(ValueError, match="DistributedDataParallel") as err:
                probes.gradient_stats(ddp, F.cross_entropy, x[mine], y[mine], **kw)
            errors.append(str(err.value))
        # different numbers of examples per process: refused on every process (no hang)
        n = PB - rank
        with pytest.raises(ValueError, match="same number of examples") as err:
            probes.probed_step(ddp, F.cross_entropy, x[:n], y[:n], opt)
        errors.append(str(err.value))
        # a non-finite loss on one process only: every process reports the divergence, none steps
        before = [p.detach().clone() for p in ddp.parameters()]
        xb = x[mine].clone()
        if rank == 1:  # a finite input whose logits overflow: a NaN loss
            xb[0] = 3e38 * torch.sign(ddp.module.fc1.weight[0].detach())
        loss, m = probes.probed_step(ddp, F.cross_entropy, xb, y[mine], opt)
        out["diverged"] = (float(loss), str(m.diverged), all(torch.equal(p, q) for p, q in zip(ddp.parameters(), before)))
        out["errors"] = errors
        torch.save(out, os.path.join(out_dir, f"probe{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes that import torch and run 10 probes: 20-60 s on a loaded 2-core machine
def test_ddp_probes_equal_single_process(tmp_path, monkeypatch):
    """probed_step and gradient_stats on a DDP model, each of 2 processes on its 4 examples, give
    on every process the statistics of one process on the 8 examples: the float64 TinyGPT (fast
    path on Embedding, LayerNorm, RMSNorm, Linear on sequences, tied weights; torch.func for its
    position Parameter) to 1e-12 relative, a float32 MLP to 1e-4 relative (see below).  Refusals
    and a divergence on one process are reported on every process, without a hang."""
    from test_fastpath_layers import TinyGPT

    from deepmodels import models

    ids, x, y = _probe_data()
    everything = slice(0, WORLD * PB)
    ref = {"gpt": _probe_run(TinyGPT(), everything, ids=ids),
           "mlp": _probe_run(models.mlp(6, 3, (10,), seed=0), everything, x=x, y=y)}
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    run_processes(_probe_worker, (str(tmp_path),), WORLD)
    got = [torch.load(tmp_path / f"probe{r}.pt") for r in range(WORLD)]
    # float64: only rounding (sums in another order, eps 2.2e-16) separates the two: seen 2.5e-15.
    # float32: the per-example and mean gradients of 4 and of 8 examples come from differently
    # shaped matmuls (entries rounded to ~1e-7 relative, eps 1.2e-7), and grad_norm_sq_unbiased and
    # trace_cov are differences such as E|g_i|^2 - |g_bar|^2 that amplify this by their terms' ratio
    # (about 10 here): seen 3.4e-6, so 1e-4 leaves a 30x margin while a wrong sum (a process left
    # out, the local mean) is off by O(1) (a local mean in the torch.func path: 0.7-3.6 relative).
    tol = {"gpt": 1e-12, "mlp": 1e-4}
    assert "module.pos" not in got[0]["gpt"][0][3]["path_func"] and "pos" in got[0]["gpt"][0][3]["path_func"]
    for name, rtol in tol.items():
        for i, (want, layers, n, cov) in enumerate(ref[name]):
            for r in range(WORLD):
                stats, g_layers, g_n, g_cov = got[r][name][i]
                assert (g_layers, g_n, g_cov) == (layers, n, cov), (name, i, r)
                for k, v in want.items():
                    np.testing.assert_allclose(stats[k], v, rtol=rtol, atol=0, err_msg=f"{name} call {i} {k}")
    for r in range(WORLD):
        assert len(got[r]["errors"]) == 5
        loss, why, unchanged = got[r]["diverged"]
        assert loss == math.inf and why and unchanged, got[r]["diverged"]
    assert "loss is not finite" in got[1]["diverged"][1]  # the process with the overflow says so


# --------------------------------------------------------------------------------------------------
# deferred steps (GradientNoiseScale.update(..., sync=False)): one all-reduce for several steps
# --------------------------------------------------------------------------------------------------
def _backward_step(ddp, x, y, step, rank):
    for m in range(M):
        j = rank * M + m
        with ddp.no_sync() if m < M - 1 else contextlib.nullcontext():
            (F.cross_entropy(ddp(x[step, j]), y[step, j]) / M).backward()


def _defer_worker(rank, out_dir):
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        from torch.nn.parallel import DistributedDataParallel as DDP

        from deepmodels.callbacks import probing

        import deepmodels.gns as gns_module

        x, y = _data()
        out = {}
        # every step joined, and steps 0, 1 deferred then joined at step 2: by the DDP wrapper (its
        # all-reduce launched in the backward pass while nothing is deferred) and the bare module;
        # again with one deferred step per all-reduce (the join of more than _JOIN_ROWS steps)
        for join_rows, tag in ((gns_module._JOIN_ROWS, ""), (1, "_chunked")):
            saved, gns_module._JOIN_ROWS = gns_module._JOIN_ROWS, join_rows
            ddp = DDP(_model())
            with GradientNoiseScale(ddp) as every, GradientNoiseScale(ddp) as deferred, \
                    GradientNoiseScale(ddp.module) as bare:
                rows = []
                for step in range(STEPS):
                    _backward_step(ddp, x, y, step, rank)
                    rows.append(every.update(micro_batch_size=B).as_dict())
                    last = step == STEPS - 1
                    for est in (deferred, bare):
                        assert (est.update(micro_batch_size=B, sync=last) is None) != last
                    if step == 0:
                        with pytest.raises(ValueError, match="call sync\\(\\) on every process"):
                            deferred.state_dict()
                    _sgd_step(ddp.module)
                out["every" + tag] = rows
                out["deferred" + tag] = [e.as_dict() for e in deferred.synced]
                out["bare" + tag] = [e.as_dict() for e in bare.synced]
                out["states" + tag] = (every.state_dict(), deferred.state_dict(), bare.state_dict())
            gns_module._JOIN_ROWS = saved
        # skip under deferral: process 0 skips step 0, process 1 updates it, both deferred; then both
        # join at step 1; beside, the same with every step joined
        ddp = DDP(_model())
        with GradientNoiseScale(ddp) as deferred, GradientNoiseScale(ddp) as every:
            rows = []
            for step in range(2):
                _backward_step(ddp, x, y, step, rank)
                if step == 0 and rank == 0:
                    deferred.skip(sync=False)
                    every.skip()
                else:
                    deferred.update(micro_batch_size=B, sync=step == 1)
                    rows.append(every.update(micro_batch_size=B).as_dict())
                _sgd_step(ddp.module)
            out["skip"] = ([e.as_dict() for e in deferred.synced], rows, deferred.ema.t)
        # a process that deferred one step more: refused on both processes (no hang), then aligned again
        model = _model()  # no DDP: GradientNoiseScale joins the default group, and no gradient all-reduce
        with GradientNoiseScale(model) as gns:
            for step in range(1 + (rank == 0)):
                for m in range(M):
                    F.cross_entropy(model(x[step, m]), y[step, m]).backward()
                if step == 0 and rank == 0:
                    gns.update(micro_batch_size=B, sync=False)
                else:
                    with pytest.raises(ValueError, match="different numbers of deferred steps") as err:
                        gns.update(micro_batch_size=B)
                    out["mismatch"] = (str(err.value), gns.n_deferred, gns.ema.t)
                model.zero_grad()
            out["after"] = gns.sync()
        # probing(every=2) defers step 1 and joins it at step 2: the rows of every=1 at steps 0 and 2;
        # state_dict() joins deferred steps (the same EMA)
        ddp = DDP(_model())
        with probing(ddp, every=1) as one, probing(ddp, every=2) as two:
            got = []
            for step in range(STEPS):
                _backward_step(ddp, x, y, step, rank)
                one.step()
                got.append(two.step())
                if step == 1:
                    assert two.estimator.n_deferred == 1
                    states = (one.state_dict()["estimator"], two.state_dict()["estimator"])
                    assert two.estimator.n_deferred == 0
                _sgd_step(ddp.module)
            out["probe"] = ([r.as_dict() for r in one.rows], [r.as_dict() for r in two.rows],
                            [e is None for e in got], states)
        torch.save(out, os.path.join(out_dir, f"defer{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned gloo processes: 10-20 s, minutes on a loaded 2-core machine
def test_ddp_deferred_steps_equal_every_step(tmp_path, monkeypatch):
    """Steps deferred on 2 DDP processes and joined by one all-reduce (or one per step, with the
    join's capacity patched to 1 step) give, step for step, the
    estimates and EMA of joining every step, bit for bit (the same float64 sums: a + b either way),
    on every process, by the wrapper and the bare module, and those of one process on the same
    examples; a skip deferred on one process while the other defers an update; processes with
    different numbers of deferred steps are refused on both (no hang: the test's deadline) and are
    aligned again after; probing(every=2) writes the rows of every=1."""
    ref_rows, _ = _single_process()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    run_processes(_defer_worker, (str(tmp_path),), WORLD, timeout_s=240)
    got = [torch.load(tmp_path / f"defer{r}.pt") for r in range(WORLD)]
    for g in got:
        assert g["deferred"] == g["every"] == g["bare"] and [r["step"] for r in g["deferred"]] == [0, 1, 2]
        assert g["states"][0] == g["states"][1] == g["states"][2]
        assert g["deferred_chunked"] == g["every_chunked"] == g["bare_chunked"] == g["every"]
        assert g["states_chunked"] == g["states"]
        for step, (row, ref) in enumerate(zip(g["deferred"], ref_rows)):
            for k, v in ref.items():
                assert row[k] == pytest.approx(v, rel=1e-4, abs=1e-6 * abs(ref["grad_norm_sq_micro"])), (step, k)
    assert got[0]["every"] == got[1]["every"]
    # the skip: process 1 has both steps, process 0 only step 1; the per-step numbers agree everywhere
    (synced0, every0, t0), (synced1, every1, t1) = got[0]["skip"], got[1]["skip"]
    assert synced0 == every0 and synced1 == every1 and (t0, t1) == (1, 2)
    assert [r["step"] for r in synced0] == [0] and [r["step"] for r in synced1] == [0, 1]
    for k in ("grad_norm_sq_micro", "grad_norm_sq_step", "trace_cov", "noise_scale_unbiased", "n_micro_batches"):
        assert synced0[0][k] == synced1[1][k], k
    for r, g in enumerate(got):
        message, deferred, t = g["mismatch"]
        assert "this one: " + ("1, and a step to join" if r == 0 else "0, and a step to join") in message
        assert (deferred, t, g["after"]) == (0, 0, [])
    for g in got:
        rows_one, rows_two, deferred, (state_one, state_two) = g["probe"]
        assert deferred == [False, True, False] and state_one == state_two
        assert rows_two == [rows_one[0], rows_one[2]]
