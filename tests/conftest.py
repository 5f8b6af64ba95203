import numpy as np
import pytest

from toymodels import EMA, SGD, Momentum


def reference_curve(h, c, init_sq, optimizer, batch_size, n_steps):
    """Independent slow recursion: per-mode 2nd moments stepped with plain numpy, lr from the schedule."""
    u = optimizer.init
    S = init_sq[:, None, None] * np.outer(u, u)[None]
    lrs = optimizer.lr.values(n_steps)
    r = optimizer.readout
    out = []
    for k in range(n_steps + 1):
        out.append(0.5 * np.sum(h * S[:, r, r]))
        if k == n_steps:
            break
        A, b = optimizer.transition(h, lrs[k])
        S = np.einsum("ijk,ikl,iml->ijm", A, S, A) + (c / batch_size)[:, None, None] * np.einsum("ij,ik->ijk", b, b)
    return np.array(out)


OPTIMIZERS = {
    "sgd": SGD(0.6),
    "precond": SGD(0.3, precond=0.5),
    "momentum": Momentum(0.2, 0.8),
    "ema": EMA(SGD(0.6), 0.9),
    "momentum_ema": EMA(Momentum(0.2, 0.8), 0.9),
}


@pytest.fixture(params=list(OPTIMIZERS))
def optimizer(request):
    return OPTIMIZERS[request.param]


def probe_devices() -> list:
    """The devices the probe tests run on: "cpu" always, and "cuda" where ``torch.cuda.is_available()``
    (CI has no GPU; a GPU machine runs every ``device`` test on both)."""
    import torch

    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_generate_tests(metafunc):
    """A test that takes a ``device`` argument runs once per device of :func:`probe_devices`."""
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", probe_devices(), indirect=True)


@pytest.fixture
def device(request):
    """The device of this run of the test (a string, for ``.to(device)``); on a GPU, float32
    arithmetic as exact as the CPU's (TF32 off in matmuls and convolutions: the tests compare
    paths to float32 rounding), restored afterwards."""
    import torch

    if request.param != "cuda":
        yield request.param
        return
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield request.param
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.fixture(scope="session")
def quick_study(tmp_path_factory):
    """``quick_study(NAME)``: the folder of ``python -m studies run NAME --quick``, run once per test
    session (the gallery's command-line test and the study's own checks share the run)."""
    from studies.__main__ import main

    done = {}

    def run(name):
        if name not in done:
            out = tmp_path_factory.mktemp(f"quick_{name}")
            main(["run", name, "--quick", "--out", str(out), "--no-progress"])
            done[name] = out
        return done[name]

    return run


def pytest_sessionstart(session):
    """On a fresh clone (an empty numba cache) compile the exact engine's later kernels in a second
    process while the first tests run (:func:`toymodels.warmup.start`, as a first sweep does;
    nothing when the cache is warm or there is one core)."""
    from toymodels import warmup

    warmup.start()
