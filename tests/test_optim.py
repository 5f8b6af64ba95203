"""deepmodels.optim: M3 / RM3 / RA3 and winsorization against independent references."""

import numpy as np
import pytest
import torch

from deepmodels import models, pergrad
from deepmodels.optim import M3, RA3, RM3, Winsorized, median_of_3, winsorized_mean


def _feed(opt, grads_seq, inner_lr=1.0):
    """Feed a sequence of gradients for one parameter; with SGD(lr=1) from 0 the update is -aggregate."""
    w = opt.params[0]
    out = []
    for g in grads_seq:
        before = w.detach().clone()
        w.grad = g.clone()
        opt.step()
        out.append((before - w.detach()) / inner_lr)
    return out


def test_median_of_3_against_torch_median():
    gen = torch.Generator().manual_seed(0)
    a, b, c = torch.randn(3, 1000, dtype=torch.float64, generator=gen)
    ref = torch.stack([a, b, c]).median(0).values
    assert torch.equal(median_of_3(a, b, c), ref)  # one of the three values, exactly
    ints = torch.randint(-3, 4, (3, 500), generator=gen).double()  # ties: exact
    assert torch.equal(median_of_3(*ints), ints.median(0).values)
    # the paper's a + b + c - min - max agrees on ordinary values ...
    paper = a + b + c - torch.minimum(torch.minimum(a, b), c) - torch.maximum(torch.maximum(a, b), c)
    torch.testing.assert_close(median_of_3(a, b, c), paper, rtol=0, atol=1e-14)
    # ... but not where one micro-batch dwarfs the others, the case M3 is for
    big = torch.tensor([1e8, float("inf"), -float("inf")], dtype=torch.float32)
    one, two = torch.ones(3), 2 * torch.ones(3)
    want = torch.tensor([2.0, 2.0, 1.0])
    for perm in ((big, one, two), (one, big, two), (two, one, big)):
        assert torch.equal(median_of_3(*perm), want)


def test_m3_orthogonal_example_is_exactly_the_common_part():
    """Paper Sec. 3.2: g_i = u_i + c, u_i on disjoint coordinates outside c's support.  Every M3 update
    (3 micro-batches of b = 2 drawn without replacement) is exactly c, so its expectation is c, while
    SGD's update on the same 6 examples carries their idiosyncratic parts."""
    m, k = 12, 3
    c = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    G = torch.zeros(m, k + m, dtype=torch.float64)
    G[:, :k] = c
    signs = torch.tensor([1.0, -1.0], dtype=torch.float64).repeat(m // 2)
    G[torch.arange(m), k + torch.arange(m)] = torch.arange(1.0, m + 1, dtype=torch.float64) * signs
    expected = torch.cat([c, torch.zeros(m, dtype=torch.float64)])
    rng = np.random.default_rng(0)
    for _ in range(30):
        w = torch.nn.Parameter(torch.zeros(k + m, dtype=torch.float64))
        opt = M3(torch.optim.SGD([w], lr=1.0))
        idx = torch.as_tensor(rng.choice(m, size=6, replace=False)).reshape(3, 2)

        def closure(i):
            loss = (G[idx[i]] @ w).mean()  # per-example loss g_i . w, gradient g_i
            loss.backward()
            return loss

        losses = opt.step(closure)
        assert len(losses) == 3
        assert torch.equal(-w.detach(), expected)
        sgd = G[idx.reshape(-1)].mean(0)
        assert torch.count_nonzero(sgd[k:]) == 6 and torch.equal(sgd[:k], c)
    # the same through precomputed gradients
    w = torch.nn.Parameter(torch.zeros(k + m, dtype=torch.float64))
    M3(torch.optim.SGD([w], lr=1.0)).step(grads=[[G[[0, 1]].mean(0)], [G[[2, 3]].mean(0)], [G[[4, 5]].mean(0)]])
    assert torch.equal(-w.detach(), expected)


@pytest.mark.parametrize("cls, reduce", [(RA3, lambda s: s.mean(0)), (RM3, lambda s: s.median(0).values)])
def test_rolling_against_reference_over_many_updates(cls, reduce):
    """Steps 1 and 2 (buffer not full): g_1, then (g_1 + g_2) / 2; from step 3 on, the mean (RA3) or the
    torch.median (RM3) of the last three gradients, still exact after 400 updates; buffer bounded."""
    gen = torch.Generator().manual_seed(1)
    gs = torch.randn(400, 4, 5, dtype=torch.float64, generator=gen)
    w = torch.nn.Parameter(torch.zeros(4, 5, dtype=torch.float64))
    opt = cls(torch.optim.SGD([w], lr=1.0))
    got = _feed(opt, gs)
    torch.testing.assert_close(got[0], gs[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], (gs[0] + gs[1]) / 2, rtol=0, atol=1e-15)
    for t in range(2, len(gs)):
        torch.testing.assert_close(got[t], reduce(gs[t - 2:t + 1]), rtol=0, atol=1e-14)
    assert opt.state[w]["buffer"].shape == (3, 4, 5) and opt.state[w]["count"] == 400


@pytest.mark.parametrize("cls", [RM3, RA3])
def test_rolling_wraps_any_optimizer(cls):
    """RM3/RA3 around Adam give Adam's steps on the reference aggregate."""
    gen = torch.Generator().manual_seed(2)
    gs = torch.randn(50, 6, dtype=torch.float64, generator=gen)
    w = torch.nn.Parameter(torch.zeros(6, dtype=torch.float64))
    v = torch.nn.Parameter(torch.zeros(6, dtype=torch.float64))
    wrapped, adam = cls(torch.optim.Adam([w], lr=0.01)), torch.optim.Adam([v], lr=0.01)
    ref = _feed(cls(torch.optim.SGD([torch.nn.Parameter(torch.zeros(6, dtype=torch.float64))], lr=1.0)), gs)
    for g, r in zip(gs, ref):
        w.grad, v.grad = g.clone(), r.clone()
        wrapped.step()
        adam.step()
    torch.testing.assert_close(w.detach(), v.detach(), rtol=0, atol=1e-12)


def test_rolling_skips_parameters_without_gradient():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    opt = RM3(torch.optim.SGD([a, b], lr=1.0))
    a.grad = torch.ones(2)
    opt.step()
    assert opt.state[a]["count"] == 1 and opt.state[b]["count"] == 0 and opt.state[b]["buffer"] is None
    assert torch.equal(b.detach(), torch.zeros(3))


def _tiny_problem(seed=0, n=24):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=gen)
    return models.mlp(5, 3, (8,), seed=seed).double(), x, y


@pytest.mark.parametrize("name", ["m3", "rm3", "ra3", "winsorized"])
def test_networks_train_for_hundreds_of_updates(name):
    """Every wrapper keeps working on a network through 300 updates (winsorization, stateless: 30); at
    the last steps the update still equals the reference aggregate of that step's gradients."""
    model, x, y = _tiny_problem()
    params = list(model.parameters())
    inner = torch.optim.SGD(params, lr=0.05)
    opt = {"m3": M3, "rm3": RM3, "ra3": RA3}.get(name, lambda o: Winsorized(o, 2))(inner)
    loss_fn = torch.nn.functional.cross_entropy
    grad = lambda i: torch.autograd.grad(loss_fn(model(x[i]), y[i]), params)  # noqa: E731
    history = []  # the last three mini-batch gradients (rolling wrappers)
    gen = torch.Generator().manual_seed(3)
    n_steps = 30 if name == "winsorized" else 300
    for t in range(n_steps):
        idx = torch.randint(0, x.shape[0], (9,), generator=gen)
        before = [p.detach().clone() for p in params]
        check = t >= n_steps - 3
        if name == "m3":
            def closure(i):
                loss = loss_fn(model(x[idx[3 * i:3 * i + 3]]), y[idx[3 * i:3 * i + 3]])
                loss.backward()
                return loss
            if check:
                parts = [grad(idx[3 * i:3 * i + 3]) for i in range(3)]
                ref = [torch.stack(ts).median(0).values for ts in zip(*parts)]
            opt.step(closure)
        elif name == "winsorized":
            g = pergrad.per_example_grads(model, loss_fn, x[idx], y[idx])
            ref = [torch.from_numpy(_winsorized_reference(v.numpy(), 2)) for v in g.values()]
            opt.step(list(g.values()))
        else:
            history = (history + [grad(idx)])[-3:] if t >= n_steps - 5 else history
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
            if check:
                stacked = [torch.stack(ts) for ts in zip(*history)]
                ref = [s.median(0).values if name == "rm3" else s.mean(0) for s in stacked]
        if check:
            for p, b, r in zip(params, before, ref):
                torch.testing.assert_close((b - p.detach()) / 0.05, r, rtol=0, atol=1e-12)
    assert all(torch.isfinite(p).all() for p in params)
    if name in ("rm3", "ra3"):
        assert all(opt.state[p]["buffer"].shape == (3, *p.shape) and opt.state[p]["count"] == 300 for p in params)


def _winsorized_reference(g, s):
    """Slow per-coordinate numpy winsorization (paper App. B): clip to the (s+1)-th smallest/largest, average."""
    B = g.shape[0]
    flat = g.reshape(B, -1)
    out = np.empty(flat.shape[1], dtype=g.dtype)
    for j in range(flat.shape[1]):
        v = sorted(flat[:, j].tolist())
        out[j] = np.mean([min(max(e, v[s]), v[B - 1 - s]) for e in flat[:, j]])
    return out.reshape(g.shape[1:])


@pytest.mark.parametrize("B, s", [(7, 0), (7, 1), (7, 2), (7, 3), (19, 8), (19, 9)])  # s >= 8: the sort path
def test_winsorized_mean_against_numpy_reference(B, s):
    gen = torch.Generator().manual_seed(4)
    g = torch.randn(B, 3, 4, dtype=torch.float64, generator=gen)
    g[:, 0, 0] = torch.randint(-1, 2, (B,), generator=gen).double()  # ties
    np.testing.assert_allclose(winsorized_mean(g, s).numpy(), _winsorized_reference(g.numpy(), s), rtol=0, atol=1e-15)
    if 2 * s + 1 == B:  # clips everything to the median
        torch.testing.assert_close(winsorized_mean(g, s), g.median(0).values, rtol=0, atol=1e-15)


def test_winsorized_s0_is_plain_sgd():
    model, x, y = _tiny_problem(seed=5)
    twin, _, _ = _tiny_problem(seed=5)
    loss_fn = torch.nn.functional.cross_entropy
    g = pergrad.per_example_grads(model, loss_fn, x, y)
    Winsorized(torch.optim.SGD(model.parameters(), lr=0.3), 0).step(list(g.values()))
    sgd = torch.optim.SGD(twin.parameters(), lr=0.3)
    for p, v in zip(twin.parameters(), g.values()):
        p.grad = v.mean(0)
    sgd.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    # and the same as SGD on the mean loss's own backward pass, up to rounding
    ref, _, _ = _tiny_problem(seed=5)
    opt = torch.optim.SGD(ref.parameters(), lr=0.3)
    loss_fn(ref(x), y).backward()
    opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-14)


def test_errors():
    w = torch.nn.Parameter(torch.zeros(2))
    sgd = torch.optim.SGD([w], lr=0.1)
    with pytest.raises(TypeError, match="`optimizer` must be a torch.optim.Optimizer; got list"):
        RM3([w])
    with pytest.raises(ValueError, match=r"`s` must be an integer in \[0, inf\); got -1"):
        Winsorized(sgd, -1)
    with pytest.raises(TypeError, match="`s` must be an integer; got float"):
        Winsorized(sgd, 1.5)
    with pytest.raises(ValueError, match=r"`s` must be <= \(batch size - 1\) // 2 = 2 for a batch of 5 examples; got 3"):
        Winsorized(sgd, 3).step([torch.zeros(5, 2)])
    with pytest.raises(ValueError, match=r"`s` must be <= \(batch size - 1\) // 2 = 1 for a batch of 4"):
        winsorized_mean(torch.zeros(4, 2), 2)
    msg = r"`per_example\[0\]` must have shape \(B, \*p.shape\) with p.shape = \(2,\); got \(5, 3\)"
    with pytest.raises(ValueError, match=msg):
        Winsorized(sgd, 1).step([torch.zeros(5, 3)])
    with pytest.raises(ValueError, match=r"`per_example` must hold one tensor per parameter \(1\); got 2"):
        Winsorized(sgd, 1).step([torch.zeros(5, 2), torch.zeros(5, 2)])
    with pytest.raises(ValueError, match="`grads` must hold 3 micro-batch gradients; got 2"):
        M3(sgd).step(grads=[[torch.zeros(2)], [torch.zeros(2)]])
    with pytest.raises(ValueError, match=r"`grads\[1\]\[0\]` must have shape p.shape with p.shape = \(2,\); got \(3,\)"):
        M3(sgd).step(grads=[[torch.zeros(2)], [torch.zeros(3)], [torch.zeros(2)]])
    with pytest.raises(ValueError, match="give exactly one of `closure` and `grads`"):
        M3(sgd).step()
    with pytest.raises(ValueError, match="`per_example` must hold a tensor for every parameter; got None"):
        Winsorized(sgd, 1).step([None])
    with pytest.raises(ValueError, match=r"`per_example` tensors must share the batch size; got \[3, 5\]"):
        two = torch.optim.SGD([w, torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        Winsorized(two, 1).step([torch.zeros(5, 2), torch.zeros(3, 1)])
