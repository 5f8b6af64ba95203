"""The gradient-noise-scale probe in a plain loop, in a real ``lightning.Trainer.fit`` and in a real
Hugging Face ``Trainer.train``: rows on their schedule, in the trainers' logs and in a valid netCDF
file, equal to a hand-written loop with :class:`deepmodels.gns.GradientNoiseScale` on the same
batches at the same parameters, and a resumed run continuing the EMA; the optional per-example
statistics against probes.gradient_stats on the same micro-batch; the trainers under DDP (2 spawned
CPU processes, gloo) against one process on the same examples.

The trainer tests are marked slow (importing Lightning or the Hugging Face Trainer takes seconds) and
skip when the extra is not installed (``pip install -e ".[test,lightning,hf]"``).
Each trainer test records, inside the model's training forward pass, the micro-batch and the
parameters it was evaluated at; the reference replays those, so it needs neither the trainer's
optimizer nor its sampler.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import xarray as xr
from torch import nn

from deepmodels import probes
from deepmodels.callbacks import STATS, criterion_loss, probing
from deepmodels.gns import GradientNoiseScale, stack

D, B, M = 4, 4, 2  # input width, micro-batch size, micro-batches per step
NUMBERS = ("grad_norm_sq_micro", "grad_norm_sq_step", "grad_norm_sq_unbiased", "trace_cov", "noise_scale_unbiased",
           "grad_norm_sq_ema", "trace_cov_ema", "noise_scale_ema", "noise_scale_ema_sem", "noise_scale_ema_lo", "noise_scale_ema_hi", "ema_n_eff",
           "micro_batch_size", "n_micro_batches", "batch_size_now")


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, 1))


def _data(n=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g)
    return x, x[:, :1] ** 2 + 0.3 * torch.randn(n, 1, generator=g)


def _reference(net, seen):
    """The estimates of a hand-written loop on the micro-batches ``seen`` = [(step, x, y, parameters)]:
    for every step, the parameters of its first micro-batch, then (loss / M).backward() on each of its
    M micro-batches, then GradientNoiseScale.update (steps of a single micro-batch skipped)."""
    net = copy.deepcopy(net)
    gns = GradientNoiseScale(net)
    steps = {}
    for k, x, y, params in seen:
        steps.setdefault(k, []).append((x, y, params))
    out = []
    for k, micro in steps.items():
        if len(micro) < 2:
            continue
        with torch.no_grad():
            for p, v in zip(net.parameters(), micro[0][2]):
                p.copy_(v)
        for x, y, _ in micro:
            (F.mse_loss(net(x), y) / len(micro)).backward()
        out.append(gns.update(x.shape[0], step=k))
        net.zero_grad(set_to_none=True)
    gns.remove()
    return out


MSE = criterion_loss(F.mse_loss)  # the per-example loss of the tests' regression


class _Holder(nn.Module):
    """The network as the attribute ``net`` (layer names ``net.0``, ... as in the trainers' modules)."""

    def __init__(self, net):
        super().__init__()
        self.net = net


def _stats_reference(net, seen, steps, held=False, n_micro=None):
    """The per-example statistics of each step in ``steps`` by probes.gradient_stats on its last
    micro-batch of ``seen`` = [(step, x, y, parameters)] at its parameters, batch_size B * M (``held``:
    the network inside a module, as the trainers hold it)."""
    net = copy.deepcopy(net)
    model, loss = (_Holder(net), lambda m, b: _mse_net(m, b)) if held else (net, MSE)
    last = {k: (x, y, params) for k, x, y, params in seen}
    out = []
    for k in steps:
        x, y, params = last[k]
        with torch.no_grad():
            for p, v in zip(net.parameters(), params):
                p.copy_(v)
        n = sum(1 for m in seen if m[0] == k) if n_micro is None else n_micro
        out.append(probes.gradient_stats(model, loss, batch=(x, y), batch_size=float(B * n), step=k))
    return xr.concat(out, dim="step")


def _assert_stats_equal(ds, ref, rtol=1e-6):
    assert list(ds.step.values) == list(ref.step.values) and list(ds.layer.values) == list(ref.layer.values)
    for name in STATS:
        np.testing.assert_allclose(ds[name].values, ref[name].values, rtol=rtol, atol=0, err_msg=name)


def _assert_rows_equal(ds, estimates, steps, rtol=1e-6):
    ref = stack([e for e in estimates if e.step in steps])
    assert list(ds.step.values) == list(steps)
    for name in NUMBERS:
        np.testing.assert_allclose(ds[name].values, ref[name].values, rtol=rtol, atol=0, err_msg=name)


def _loop(net, x, y, steps, probe=None, start=0, lr=0.1, stats=False):
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    seen, out = [], []
    for k in range(start, start + steps):
        for j in range(M):
            i = slice((k * M + j) * B % len(x), (k * M + j) * B % len(x) + B)
            seen.append((k, x[i], y[i], [p.detach().clone() for p in net.parameters()]))
            (F.mse_loss(net(x[i]), y[i]) / M).backward()
        if probe is None:
            out.append(None)
        else:
            out.append(probe.step(batch=(x[i], y[i])) if stats else probe.step())
        opt.step()
        opt.zero_grad()
    return seen, out


# --------------------------------------------------------------------------------------------------
# a plain loop
# --------------------------------------------------------------------------------------------------
def test_probing_rows_file_and_reference(tmp_path):
    x, y = _data()
    net = _net()
    path = tmp_path / "gns.nc"
    start = copy.deepcopy(net)
    with probing(net, path=path, every=2) as probe:
        seen, ests = _loop(net, x, y, 6, probe)
        assert [e.step for e in ests] == list(range(6))
    ds = xr.load_dataset(path)
    assert ds.attrs["source"] == "measurement" and ds.attrs["every"] == 2 and ds.attrs["trainer"] == "loop"
    _assert_rows_equal(ds, _reference(start, seen), [0, 2, 4], rtol=0)  # the same operations: bit for bit
    xr.testing.assert_identical(ds, probe.dataset())
    assert all(int(v) == B for v in ds.micro_batch_size.values) and all(int(v) == B * M for v in ds.batch_size_now)


def test_probing_resume_continues_the_ema(tmp_path):
    x, y = _data()
    whole = tmp_path / "whole.nc"
    net = _net()
    with probing(net, path=whole, every=2) as probe:
        _loop(net, x, y, 6, probe)

    part = tmp_path / "part.nc"
    net = _net()
    with probing(net, path=part, every=2) as probe:
        _loop(net, x, y, 3, probe)
        state = copy.deepcopy(probe.state_dict())
        params = copy.deepcopy(net.state_dict())
    assert list(xr.load_dataset(part).step.values) == [0, 2]  # state_dict() wrote every row it holds
    net = _net(seed=5)
    net.load_state_dict(params)
    with probing(net, path=part, every=2) as probe:
        probe.load_state_dict(state)
        _loop(net, x, y, 3, probe, start=3)
    xr.testing.assert_identical(xr.load_dataset(part), xr.load_dataset(whole))


def test_probing_per_example_stats_on_schedule_and_resumed(tmp_path):
    """stats_every=3: the per-example statistics of each third step's last micro-batch, equal to
    probes.gradient_stats there; the probe's own backward pass is no micro-batch of the estimator, and
    .grad and the random state are left as they were (the same training and rows, bit for bit, as
    without it); the file's group holds them; a resumed run rewrites the same file."""
    x, y = _data()
    plain = _net()
    with probing(plain, every=2) as probe:
        _loop(plain, x, y, 6, probe)
    plain_rows = probe.dataset()
    whole = tmp_path / "whole.nc"
    net = _net()
    start = copy.deepcopy(net)
    torch.manual_seed(7)
    with probing(net, path=whole, every=2, stats_every=3, stats_loss_fn=MSE) as probe:
        with pytest.raises(ValueError, match="`batch` must be given at step 0"):
            probe.step()
        seen, _ = _loop(net, x, y, 6, probe, stats=True)
    after = torch.rand(())
    torch.manual_seed(7)
    assert after == torch.rand(())  # the probe drew nothing from the global generator
    for p, q in zip(net.parameters(), plain.parameters()):
        assert torch.equal(p, q)  # .grad restored: the same training
    xr.testing.assert_identical(xr.load_dataset(whole), plain_rows.assign_attrs(probe.dataset().attrs))
    stats = xr.load_dataset(whole, group="per_example")
    xr.testing.assert_identical(stats, probe.stats_dataset())
    _assert_stats_equal(stats, _stats_reference(start, seen, [0, 3]))
    assert list(stats.batch_size_now.values) == [B * M] * 2 and list(stats.micro_batch_size.values) == [B] * 2
    assert stats.attrs["stats_every"] == "3" and stats.attrs["method"] == "hooks"

    part = tmp_path / "part.nc"
    net = _net()
    with probing(net, path=part, every=2, stats_every=3, stats_loss_fn=MSE) as probe:
        _loop(net, x, y, 4, probe, stats=True)
        state = copy.deepcopy(probe.state_dict())
        params = copy.deepcopy(net.state_dict())
    net = _net(seed=5)
    net.load_state_dict(params)
    with probing(net, path=part, every=2, stats_every=3, stats_loss_fn=MSE) as probe:
        with pytest.raises(ValueError, match="must come from a probe with stats_every=2; got stats_every=3"):
            probing(_net(), every=2, stats_every=2).load_state_dict(state)
        probe.load_state_dict(state)
        _loop(net, x, y, 2, probe, start=4, stats=True)
    xr.testing.assert_identical(xr.load_dataset(part), xr.load_dataset(whole))
    xr.testing.assert_identical(xr.load_dataset(part, group="per_example"), stats)


def test_probing_skips_a_step_of_unequal_micro_batches_and_needs_a_forward():
    x, y = _data()
    net = _net()
    with probing(net) as probe:
        (F.mse_loss(net(x[:4]), y[:4]) / 2).backward()
        (F.mse_loss(net(x[4:7]), y[4:7]) / 2).backward()
        with pytest.warns(RuntimeWarning, match=r"step 0 skipped .* sizes \[4, 3\]"):
            assert probe.step() is None
        net.zero_grad()
        x2 = x[:4].requires_grad_(False)
        (F.mse_loss(net(x2), y[:4]) / 2).backward()
        (F.mse_loss(net(x[4:8]), y[4:8]) / 2).backward()
        est = probe.step()  # the skipped step's micro-batches are not mixed into this one
        assert est.step == 1 and est.n_micro_batches == 2 and est.micro_batch_size == 4
        with torch.no_grad():
            net(x)
        with pytest.raises(ValueError, match="`micro_batch_size` must be given"):
            probe.step()
    assert probe.dataset().sizes["step"] == 1


def test_probing_refuses_bad_settings(tmp_path):
    net = _net()
    with pytest.raises(ValueError, match="`path` must be a file path"):
        probing(net, path=tmp_path)
    with pytest.raises(ValueError, match="`path` must be in an existing folder"):
        probing(net, path=tmp_path / "no" / "gns.nc")
    with pytest.raises(ValueError, match="`every` must be"):
        probing(net, every=0)
    probe = probing(net, every=3)
    with pytest.raises(ValueError, match="`state_dict` must come from a probe with every=3"):
        probe.load_state_dict(probing(_net(), every=2).state_dict())


# --------------------------------------------------------------------------------------------------
# Lightning
# --------------------------------------------------------------------------------------------------
def _lightning_fit(tmp_path, probe, max_steps, ckpt_path=None, name="run", accumulate=M, **trainer_kwargs):
    L = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader, TensorDataset

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _net()
            self.seen = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            self.seen.append((self.trainer.global_step, x, y, [p.detach().clone() for p in self.net.parameters()]))
            return F.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    module = Tiny()
    start = copy.deepcopy(module.net)
    logger = CSVLogger(tmp_path, name=name)
    settings = dict(max_steps=max_steps, accumulate_grad_batches=accumulate, accelerator="cpu", devices=1,
                    logger=logger, callbacks=[probe], enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, log_every_n_steps=1, num_sanity_val_steps=0)
    trainer = L.Trainer(**{**settings, **trainer_kwargs})
    loader = DataLoader(TensorDataset(*_data()), batch_size=B, shuffle=False)  # 8 micro-batches: 4 steps an epoch
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return trainer, module, start, logger


@pytest.mark.slow  # importing the trainer takes 3-10 s
def test_lightning_logs_on_schedule_and_equals_the_reference(tmp_path):
    pytest.importorskip("lightning.pytorch")
    import pandas as pd

    from deepmodels.callbacks import LightningProbe

    path = tmp_path / "gns.nc"
    trainer, module, start, logger = _lightning_fit(tmp_path, LightningProbe(path=path, every=2), max_steps=6)
    ds = xr.load_dataset(path)
    assert ds.attrs["trainer"] == "lightning"
    _assert_rows_equal(ds, _reference(start, module.seen), [0, 2, 4])
    csv = pd.read_csv(f"{logger.log_dir}/metrics.csv")
    logged = csv.dropna(subset=["gns/noise_scale_ema"])
    assert list(logged.step) == [0, 2, 4]
    np.testing.assert_allclose(logged["gns/noise_scale_ema"], ds.noise_scale_ema.values, rtol=1e-6)
    np.testing.assert_allclose(logged["gns/trace_cov"], ds.trace_cov.values, rtol=1e-6)
    assert "stats/noise_scale" not in csv  # off by default
    with pytest.raises(ValueError, match="`accumulate_grad_batches` must be >= 2 with LightningProbe"):
        _lightning_fit(tmp_path, LightningProbe(), max_steps=1, accumulate=1, name="one")


def _mse_net(model, batch):
    """The tests' per-example loss through the network inside a Lightning or Hugging Face module."""
    x, y = (batch["x"], batch["labels"]) if isinstance(batch, dict) else batch
    return F.mse_loss(model.net(x), y, reduction="none").mean(1)


@pytest.mark.slow  # importing the trainer takes 3-10 s
def test_lightning_per_example_stats_on_schedule(tmp_path):
    pytest.importorskip("lightning.pytorch")
    import pandas as pd

    from deepmodels.callbacks import LightningProbe

    path = tmp_path / "gns.nc"
    probe = LightningProbe(path=path, every=2, stats_every=3, stats_loss_fn=_mse_net)
    trainer, module, start, logger = _lightning_fit(tmp_path, probe, max_steps=6)
    _assert_rows_equal(xr.load_dataset(path), _reference(start, module.seen), [0, 2, 4])  # the probe's pass not counted
    stats = xr.load_dataset(path, group="per_example")
    _assert_stats_equal(stats, _stats_reference(start, module.seen, [0, 3], held=True))
    csv = pd.read_csv(f"{logger.log_dir}/metrics.csv")
    logged = csv.dropna(subset=["stats/noise_scale"])
    assert list(logged.step) == [0, 3]
    for name in ("grad_norm_sq", "trace_cov", "grad_var", "grad_nvar", "noise_scale"):
        np.testing.assert_allclose(logged[f"stats/{name}"], stats[name].sel(layer="total").values, rtol=1e-6)


@pytest.mark.slow  # importing the trainer takes 3-10 s
def test_lightning_resume_continues_the_ema(tmp_path):
    pytest.importorskip("lightning.pytorch")
    from deepmodels.callbacks import LightningProbe

    path = tmp_path / "gns.nc"
    trainer, first, start, _ = _lightning_fit(tmp_path, LightningProbe(path=path, every=2), max_steps=3, name="a")
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    path.unlink()  # the resumed run rewrites the checkpoint's rows
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # Lightning may end a resumed epoch with a 1-batch step
        _, second, _, _ = _lightning_fit(tmp_path, LightningProbe(path=path, every=2), max_steps=8,
                                         ckpt_path=tmp_path / "a.ckpt", name="b")
    ds = xr.load_dataset(path)
    ref = _reference(start, first.seen + second.seen)
    steps = [e.step for e in ref if e.step % 2 == 0]
    assert steps[:2] == [0, 2] and steps[-1] >= 6
    _assert_rows_equal(ds, ref, steps)


# --------------------------------------------------------------------------------------------------
# Hugging Face
# --------------------------------------------------------------------------------------------------
class _HFTiny(nn.Module):
    """A plain torch model in the Hugging Face calling convention: ``forward(x, labels)`` returns
    ``{"loss", "logits"}``; records its training micro-batches and the parameters they met."""

    def __init__(self):
        super().__init__()
        self.net = _net()
        self.seen = []
        self.step = None  # the trainer's global_step, set by _tag_steps

    def forward(self, x, labels):
        if self.training and torch.is_grad_enabled():
            self.seen.append((self.step, x.detach().clone(), labels.detach().clone(),
                              [p.detach().clone() for p in self.net.parameters()]))
        out = self.net(x)
        return {"loss": F.mse_loss(out, labels), "logits": out}


class _Rows(torch.utils.data.Dataset):
    def __init__(self):
        self.x, self.y = _data()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def _hf_train(tmp_path, probe, max_steps, resume=None, **kwargs):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    settings = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=B, gradient_accumulation_steps=M,
                    max_steps=max_steps, learning_rate=0.05, max_grad_norm=0.0, report_to=[], use_cpu=True,
                    logging_steps=1, disable_tqdm=True, seed=0, dataloader_drop_last=True,
                    restore_callback_states_from_checkpoint=True)
    args = transformers.TrainingArguments(**{**settings, **kwargs})
    class TagSteps(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            model.step = state.global_step

    model = _HFTiny()
    start = copy.deepcopy(model.net)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Rows(), callbacks=[TagSteps(), probe])
    trainer.train(resume_from_checkpoint=resume)
    return trainer, model, start


@pytest.mark.slow  # importing the trainer takes 3-10 s
def test_hf_logs_on_schedule_and_equals_the_reference(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from deepmodels.callbacks import HFProbe

    path = tmp_path / "gns.nc"
    trainer, model, start = _hf_train(tmp_path, HFProbe(path=path, every=2), max_steps=5, save_strategy="no")
    ds = xr.load_dataset(path)
    assert ds.attrs["trainer"] == "transformers"
    _assert_rows_equal(ds, _reference(start, model.seen), [0, 2, 4])
    logged = [h for h in trainer.state.log_history if "gns/noise_scale_ema" in h]
    assert [h["step"] for h in logged] == [0, 2, 4]
    np.testing.assert_allclose([h["gns/noise_scale_ema"] for h in logged], ds.noise_scale_ema.values, rtol=1e-12)


@pytest.mark.slow  # importing the trainer takes 3-10 s
def test_hf_per_example_stats_on_schedule_and_resumed(tmp_path):
    """Stats every 2 steps on the micro-batch the model's last training forward pass took, logged and
    in the file's group; a resumed trainer rebuilds the callback (with the loss of this process's
    HFProbe) and rewrites the same rows."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from deepmodels.callbacks import HFProbe

    path = tmp_path / "gns.nc"
    settings = dict(path=path, every=2, stats_every=2)
    trainer, first, start = _hf_train(tmp_path, HFProbe(**settings, stats_loss_fn=_mse_net), max_steps=6,
                                      save_strategy="steps", save_steps=3)
    whole = xr.load_dataset(path, group="per_example")
    _assert_stats_equal(whole, _stats_reference(start, first.seen, [0, 2, 4], held=True))
    _assert_rows_equal(xr.load_dataset(path), _reference(start, first.seen), [0, 2, 4])
    logged = [h for h in trainer.state.log_history if "stats/grad_nvar" in h]
    assert [h["step"] for h in logged] == [0, 2, 4]
    np.testing.assert_allclose([h["stats/grad_nvar"] for h in logged], whole.grad_nvar.sel(layer="total").values,
                               rtol=1e-12)
    path.unlink()
    _, second, _ = _hf_train(tmp_path, HFProbe(**settings, stats_loss_fn=_mse_net), max_steps=6,
                             resume=str(tmp_path / "out" / "checkpoint-3"), save_strategy="no")
    _assert_stats_equal(xr.load_dataset(path, group="per_example"), whole)


class _HFLM(nn.Module):
    """deepmodels' transformer in the Hugging Face causal-LM convention: ``forward(input_ids, labels)``
    returns a ``CausalLMOutput`` with logits (B, T, V) and the mean next-token loss (labels shifted
    inside, as Hugging Face models do); records its training micro-batches and parameters."""

    def __init__(self):
        super().__init__()
        from deepmodels.models import transformer

        self.lm = transformer(vocab_size=11, context_length=8, d_model=8, n_layers=1, n_heads=2, seed=3)
        self.seen, self.step = [], None

    def forward(self, input_ids, labels=None):
        from transformers.modeling_outputs import CausalLMOutput

        if self.training and torch.is_grad_enabled():
            self.seen.append((self.step, input_ids.clone(), None, [p.detach().clone() for p in self.parameters()]))
        logits = self.lm(input_ids).transpose(1, 2)
        loss = None if labels is None else F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1))
        return CausalLMOutput(loss=loss, logits=logits)


class _Tokens(torch.utils.data.Dataset):
    def __init__(self):
        self.ids = torch.randint(0, 11, (32, 8), generator=torch.Generator().manual_seed(4))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


@pytest.mark.slow  # importing the trainer takes 3-10 s
def test_hf_per_example_stats_of_a_language_model_by_default(tmp_path):
    """HFProbe's default per-example loss is pergrad.next_token_loss on the batch the model took
    (``{"input_ids", "labels"}``): the statistics of a transformer equal gradient_stats there."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from deepmodels.callbacks import HFProbe
    from deepmodels.pergrad import next_token_loss

    class TagSteps(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            model.step = state.global_step

    path = tmp_path / "gns.nc"
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=B,
                                          gradient_accumulation_steps=M, max_steps=3, learning_rate=0.05,
                                          max_grad_norm=0.0, report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
                                          save_strategy="no")
    model = _HFLM()
    start = copy.deepcopy(model)
    transformers.Trainer(model=model, args=args, train_dataset=_Tokens(),
                         callbacks=[TagSteps(), HFProbe(path=path, stats_every=2)]).train()
    stats = xr.load_dataset(path, group="per_example")
    rows = xr.load_dataset(path)
    assert list(rows.step.values) == [0, 1, 2] and list(rows.n_micro_batches.values) == [M] * 3
    ref = []
    for k in (0, 2):
        # the step's last micro-batch (the probe's own forward passes, on ids[:, :-1], are recorded too)
        ids, params = [(x, p) for step, x, _, p in model.seen if step == k and x.shape[1] == 8][-1]
        with torch.no_grad():
            for p, v in zip(start.parameters(), params):
                p.copy_(v)
        ref.append(probes.gradient_stats(start, next_token_loss, batch={"input_ids": ids}, batch_size=float(B * M),
                                         step=k))
    _assert_stats_equal(stats, xr.concat(ref, dim="step"))
    assert np.all(np.isfinite(stats.noise_scale.values)) and stats.attrs["skipped"] == ""


@pytest.mark.slow  # importing the trainer takes 3-10 s
def test_hf_refuses_clipping_and_a_single_micro_batch(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from deepmodels.callbacks import HFProbe

    with pytest.raises(ValueError, match="`max_grad_norm` must be 0 with HFProbe"):
        _hf_train(tmp_path, HFProbe(), max_steps=1, save_strategy="no", max_grad_norm=1.0)
    with pytest.raises(ValueError, match="`gradient_accumulation_steps` must be >= 2 with HFProbe"):
        _hf_train(tmp_path, HFProbe(), max_steps=1, save_strategy="no", gradient_accumulation_steps=1)


@pytest.mark.slow  # importing the trainer takes 3-10 s
def test_hf_resume_continues_the_ema(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from deepmodels.callbacks import HFProbe

    path = tmp_path / "gns.nc"
    _, first, start = _hf_train(tmp_path, HFProbe(path=path, every=2), max_steps=6, save_strategy="steps",
                                save_steps=3)
    path.unlink()  # the resumed run rewrites the checkpoint's rows
    _, second, _ = _hf_train(tmp_path, HFProbe(path=path, every=2), max_steps=6,
                             resume=str(tmp_path / "out" / "checkpoint-3"), save_strategy="no")
    assert {m[0] for m in second.seen} == {3, 4, 5}
    ds = xr.load_dataset(path)
    ref = _reference(start, [m for m in first.seen if m[0] < 3] + second.seen)
    _assert_rows_equal(ds, ref, [0, 2, 4])


# --------------------------------------------------------------------------------------------------
# a plain loop under DDP (2 CPU processes, gloo)
# --------------------------------------------------------------------------------------------------
_W, _STEPS = 2, 3


def _ddp_micro_batches():
    """Per step, W * M micro-batches (process r takes r*M .. r*M+M-1); at step 1 the last micro-batch
    of every process has one example fewer, so that step is skipped everywhere."""
    x, y = _data(n=_STEPS * _W * M * B, seed=3)
    x, y = x.reshape(_STEPS, _W * M, B, D), y.reshape(_STEPS, _W * M, B, 1)
    out = []
    for k in range(_STEPS):
        out.append([(x[k, j, :B - 1], y[k, j, :B - 1]) if k == 1 and j % M == M - 1 else (x[k, j], y[k, j])
                    for j in range(_W * M)])
    return out


def _ddp_worker(rank, out_dir):
    import contextlib
    import datetime

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", rank=rank, world_size=_W, timeout=datetime.timedelta(seconds=60))
    try:
        out = {}
        for every in (1, 2):  # every=2: the skipped step 1 is deferred (no all-reduce), joined at step 2
            ddp = DDP(_net())
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                with probing(ddp, path=f"{out_dir}/ddp{every}.nc", every=every, stats_every=2,
                             stats_loss_fn=MSE) as probe:
                    for micro in _ddp_micro_batches():
                        for m in range(M):
                            x, y = micro[rank * M + m]
                            with ddp.no_sync() if m < M - 1 else contextlib.nullcontext():
                                (F.mse_loss(ddp(x), y) / M).backward()
                        probe.step(batch=(x, y))  # process 0's per-example probe starts no all-reduce
                        with torch.no_grad():
                            for p in ddp.module.parameters():
                                p.add_(p.grad, alpha=-0.1)
                        ddp.zero_grad()
            out[every] = {"rows": [r.as_dict() for r in probe.rows], "warned": [str(w.message) for w in caught],
                          "stats_steps": [r["step"] for r in probe.stats_rows]}
        torch.save(out, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two processes
def test_probing_under_ddp_equals_one_process(tmp_path, monkeypatch):
    from processes import free_port, run_processes

    net = _net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with probing(net, every=1) as probe:
            for micro in _ddp_micro_batches():
                for x, y in micro:
                    (F.mse_loss(net(x), y) / len(micro)).backward()
                probe.step()
                with torch.no_grad():
                    for p in net.parameters():
                        p.add_(p.grad, alpha=-0.1)
                net.zero_grad()
    ref = [r.as_dict() for r in probe.rows]
    assert [r["step"] for r in ref] == [0, 2]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    run_processes(_ddp_worker, (str(tmp_path),), _W)  # spawned, with a deadline
    runs = [torch.load(tmp_path / f"rank{r}.pt") for r in range(_W)]
    assert runs[0][1]["rows"] == runs[0][2]["rows"]  # every=2 (step 1 deferred) writes the rows of every=1
    for every in (1, 2):
        got = [run[every] for run in runs]
        assert got[0]["rows"] == got[1]["rows"]
        assert got[0]["stats_steps"] == [0, 2] and got[1]["stats_steps"] == []
        for g in got:
            assert any("step 1 skipped" in w for w in g["warned"])
        ds = xr.load_dataset(tmp_path / f"ddp{every}.nc")
        assert list(ds.step.values) == [0, 2]
        for row, want in zip(got[0]["rows"], ref):
            assert row["n_micro_batches"] == _W * M and row["batch_size"] == _W * M * B
            for k, v in want.items():
                assert row[k] == pytest.approx(v, rel=1e-4, abs=1e-6 * abs(want["grad_norm_sq_micro"])), k
            assert float(ds.noise_scale_ema.sel(step=row["step"])) == row["noise_scale_ema"]


# --------------------------------------------------------------------------------------------------
# the trainers under DDP (2 CPU processes, gloo), launched as torchrun would: one spawned process per
# rank with RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set
# --------------------------------------------------------------------------------------------------
def _trainer_ddp_worker(rank, out_dir, port, which):
    import os
    from pathlib import Path

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(_W), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0", LOCAL_WORLD_SIZE=str(_W))
    from deepmodels import callbacks

    writes, write = [], callbacks.resume.write

    def counted(data, path):  # which process writes the file
        writes.append(path)
        return write(data, path)

    callbacks.resume.write = counted
    settings = dict(path=f"{out_dir}/gns.nc", every=1, stats_every=2, stats_loss_fn=_mse_net)
    if which == "lightning":
        probe = callbacks.LightningProbe(**settings)
        trainer, model, start, _ = _lightning_fit(Path(out_dir), probe, max_steps=3, devices=_W, strategy="ddp")
        probe = probe.probe
    else:
        probe = callbacks.HFProbe(**settings)
        trainer, model, start = _hf_train(Path(out_dir), probe, max_steps=3, save_strategy="no")
        probe = [c for c in trainer.callback_handler.callbacks if isinstance(c, callbacks.HFProbe)][0].probe
        trainer.accelerator.wait_for_everyone()
    torch.save({"seen": model.seen, "start": start, "writes": len(writes), "rows": [r.as_dict() for r in probe.rows],
                "n_stats": len(probe.stats_rows)}, f"{out_dir}/rank{rank}.pt")


def _check_trainer_ddp(tmp_path, which):
    """The rows of the 2-process run against the single-process reference on the union of the two
    processes' micro-batches: the same examples, so the same estimates up to float32 rounding of the
    gradients (DDP's all-reduce sums them in another order; |G|^2 = (B |G_B|^2 - b |g_b|^2) / (B - b)
    cancels, hence rel 1e-4 and an absolute 1e-6 of the micro-batch norm, as in the loop's DDP test;
    observed: at most 1.1e-6 relative, on the EMA's interval ends);
    only process 0 writes the file, and its per-example statistics are those of its own last
    micro-batch, batch_size the whole step's B W M."""
    from processes import free_port, run_processes

    run_processes(_trainer_ddp_worker, (str(tmp_path), free_port(), which), _W)
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(_W)]
    assert got[0]["writes"] > 0 and got[1]["writes"] == 0
    assert got[0]["n_stats"] == 2 and got[1]["n_stats"] == 0
    assert got[0]["rows"] == got[1]["rows"]
    ref = _reference(got[0]["start"], got[0]["seen"] + got[1]["seen"])
    ds = xr.load_dataset(tmp_path / "gns.nc")
    assert list(ds.step.values) == [0, 1, 2] == [e.step for e in ref]
    for row, want in zip(got[0]["rows"], ref):
        want = want.as_dict()
        assert row["n_micro_batches"] == _W * M and row["batch_size"] == _W * M * B
        for k, v in want.items():
            assert row[k] == pytest.approx(v, rel=1e-4, abs=1e-6 * abs(want["grad_norm_sq_micro"])), k
        assert float(ds.noise_scale_unbiased.sel(step=row["step"])) == row["noise_scale_unbiased"]
    stats = xr.load_dataset(tmp_path / "gns.nc", group="per_example")
    _assert_stats_equal(stats, _stats_reference(got[0]["start"], got[0]["seen"], [0, 2], held=True, n_micro=_W * M))


@pytest.mark.slow  # two processes, each importing Lightning
def test_lightning_under_ddp_equals_one_process(tmp_path):
    pytest.importorskip("lightning.pytorch")
    _check_trainer_ddp(tmp_path, "lightning")


@pytest.mark.slow  # two processes, each importing the Hugging Face Trainer
def test_hf_under_ddp_equals_one_process(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    _check_trainer_ddp(tmp_path, "hf")


def test_criterion_loss_is_the_per_example_criterion():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, D, generator=g)
    labels = torch.randint(0, 3, (5,), generator=g)
    torch.manual_seed(0)
    classifier = nn.Linear(D, 3)
    loss = criterion_loss()  # cross-entropy
    torch.testing.assert_close(loss(classifier, (x, labels)), F.cross_entropy(classifier(x), labels, reduction="none"))
    net, (xr_, yr) = _net(), _data(n=5)
    torch.testing.assert_close(MSE(net, (xr_, yr)), ((net(xr_) - yr) ** 2)[:, 0])
    assert repr(MSE) == "criterion_loss('mse_loss')"
