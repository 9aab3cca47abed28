"""Each merge method against an independent float64 numpy reference.

The expected values are computed here from the formulas (ALGORITHMS.md, "Merge
building blocks", with mergekit 0.1.5 semantics): nothing below calls the
implementation to build an expected value.  Stochastic methods are checked by
their statistics and by decoding which task vectors survived in each entry.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from mergesearch.merging import get_method

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-5)}
DTYPES = [torch.float64, torch.float32]


# --------------------------------------------------------------------- helpers
def make(shape, n_models, dtype, seed=0, spread=1.0):
    """Random base and models, as torch tensors and as float64 arrays of the same values."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(shape)
    models = [base + spread * rng.standard_normal(shape) for _ in range(n_models)]
    tb = torch.tensor(base, dtype=dtype)
    tm = [torch.tensor(m, dtype=dtype) for m in models]
    return tb, tm, tb.double().numpy(), [m.double().numpy() for m in tm]


def call(name, base, models, seed=None, **kwargs):
    return get_method(name).fn(base, models, seed=seed or 0, **kwargs)


def check(out, expected, dtype):
    assert out.dtype == dtype
    np.testing.assert_allclose(out.double().numpy(), expected, **TOL[dtype])


def ref_topk(tau, density):
    """TIES trim: the max(1, int(density * n)) largest magnitudes survive."""
    if density >= 1:
        return tau.copy()
    flat = tau.ravel()
    keep = np.zeros(flat.size, dtype=bool)
    if density > 0:
        k = max(1, int(density * flat.size))
        keep[np.argsort(-np.abs(flat), kind="stable")[:k]] = True
    return np.where(keep, flat, 0.0).reshape(tau.shape)


def ref_band(tau, density, gamma):
    """Breadcrumbs as mergekit: ascending magnitude ranks [n_bottom, n_bottom + keep)."""
    if density >= 1:
        return tau.copy()
    flat = tau.ravel()
    n = flat.size
    keep = int(density * n)
    n_top = int(gamma * n)
    n_bottom = max(0, n - keep - n_top)
    mask = np.zeros(n, dtype=bool)
    mask[np.argsort(np.abs(flat), kind="stable")[n_bottom:n_bottom + keep]] = True
    return np.where(mask, flat, 0.0).reshape(tau.shape)


def ref_combine(base, deltas, weights, *, consensus, normalize, lam):
    """base + lambda * (weighted sum of deltas [agreeing with the elected sign]) [/ divisor]."""
    w = np.asarray(weights, dtype=np.float64).reshape(-1, *([1] * base.ndim))
    weighted = np.stack(deltas) * w
    if consensus:
        elected = np.where(weighted.sum(axis=0) >= 0, 1.0, -1.0)  # ties go to +
        agree = np.sign(weighted) == elected  # a zero entry never agrees
        mixed = np.where(agree, weighted, 0.0).sum(axis=0)
        divisor = np.where(agree, w, 0.0).sum(axis=0)
        divisor = np.where(divisor == 0, 1.0, divisor)
    else:
        mixed = weighted.sum(axis=0)
        divisor = w.sum()
        divisor = 1.0 if abs(divisor) < 1e-8 else divisor
    if normalize:
        mixed = mixed / divisor
    return base + lam * mixed


def ref_slerp(a, b, t, threshold=0.9995, eps=1e-8):
    """mergekit slerp: one angle per tensor (flattened), linear when |cos| > threshold.

    mergekit 0.1.5 stacks output tensors on the leading batch axis of its
    kernel, so each whole tensor gets its own angle.
    """
    x, y = a.ravel(), b.ravel()
    nx, ny = np.linalg.norm(x), np.linalg.norm(y)
    nx = nx if nx > eps else 1.0
    ny = ny if ny > eps else 1.0
    cos = float(np.clip(np.dot(x / nx, y / ny), -1, 1))
    if abs(cos) > threshold:
        return (1 - t) * a + t * b
    theta = math.acos(cos)
    return (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)


def ref_della_prob(tau, density, epsilon):
    """DELLA keep probability of each entry: linear in its magnitude rank within its row."""
    rows = tau.reshape(1, -1) if tau.ndim < 2 else tau.reshape(tau.shape[0], -1)
    n = rows.shape[1]
    ranks = np.argsort(np.argsort(np.abs(rows), axis=1, kind="stable"), axis=1, kind="stable")
    prob = density - epsilon + 2 * epsilon * ranks / max(n - 1, 1)
    return prob.reshape(tau.shape)


# ------------------------------------------------------------------ defaults
MERGEKIT_DEFAULTS = {  # mergekit 0.1.5 merge_methods/registry.py and linear.py
    "linear": {"normalize": True},
    "task_arithmetic": {"normalize": False, "lambda": 1.0},
    "ties": {"normalize": True, "lambda": 1.0, "density": 1.0},
    "dare_ties": {"normalize": False, "rescale": True, "lambda": 1.0, "density": 1.0},
    "dare_linear": {"normalize": False, "rescale": True, "lambda": 1.0, "density": 1.0},
    "breadcrumbs": {"normalize": False, "lambda": 1.0, "density": 1.0, "gamma": 0.01},
    "breadcrumbs_ties": {"normalize": False, "lambda": 1.0, "density": 1.0, "gamma": 0.01},
    "della": {"normalize": True, "rescale": True, "lambda": 1.0, "density": 1.0,
              "epsilon": 0.15},
    "della_linear": {"normalize": False, "rescale": True, "lambda": 1.0, "density": 1.0,
                     "epsilon": 0.15},
}


@pytest.mark.parametrize("name", sorted(MERGEKIT_DEFAULTS))
def test_defaults_match_mergekit(name):
    method = get_method(name)
    for pname, default in MERGEKIT_DEFAULTS[name].items():
        assert method.param(pname).default == default, (name, pname)
    assert method.param("weight").default is None  # required, as in mergekit
    assert method.param("weight").per_model


@pytest.mark.parametrize("name", ["slerp", "global_slerp"])
def test_slerp_t_is_required(name):
    assert get_method(name).param("t").default is None


def test_stochastic_flags():
    stochastic = {n for n in MERGEKIT_DEFAULTS if get_method(n).stochastic}
    assert stochastic == {"dare_ties", "dare_linear", "della", "della_linear"}


# -------------------------------------------------------------------- linear
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize", [True, False])
def test_linear(dtype, normalize):
    _, tm, _, m = make((6, 5), 3, dtype)
    w = [0.2, 0.5, -0.1]
    expected = sum(wi * mi for wi, mi in zip(w, m, strict=True))
    if normalize:
        expected = expected / sum(w)
    check(call("linear", None, tm, weight=w, normalize=normalize), expected, dtype)


# ---------------------------------------------------------- task arithmetic
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("lam", [1.0, 0.7])
def test_task_arithmetic(dtype, normalize, lam):
    tb, tm, b, m = make((6, 5), 3, dtype, seed=1)
    w = [0.3, 1.2, -0.4]
    mixed = sum(wi * (mi - b) for wi, mi in zip(w, m, strict=True))
    if normalize:
        mixed = mixed / sum(w)
    out = call("task_arithmetic", tb, tm, weight=w, normalize=normalize, lambda_=lam)
    check(out, b + lam * mixed, dtype)


def test_task_arithmetic_normalize_with_zero_weight_sum_divides_by_one():
    tb, tm, b, m = make((4, 3), 2, torch.float64, seed=2)
    out = call("task_arithmetic", tb, tm, weight=[0.5, -0.5], normalize=True, lambda_=1.0)
    check(out, b + 0.5 * (m[0] - b) - 0.5 * (m[1] - b), torch.float64)


# ---------------------------------------------------------------------- ties
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize(
    "weights, densities",
    [([1.0, 1.0, 1.0], [0.5, 0.5, 0.5]),
     ([0.7, 1.3, 0.4], [0.2, 0.6, 1.0]),
     ([0.8, -0.5, 1.1], [0.35, 0.5, 0.9]),
     ([0.5, 0.5, 0.5], [0.01, 0.0, 0.1])],
)
def test_ties(dtype, normalize, weights, densities):
    tb, tm, b, m = make((8, 7), 3, dtype, seed=3)
    deltas = [ref_topk(mi - b, d) for mi, d in zip(m, densities, strict=True)]
    expected = ref_combine(b, deltas, weights, consensus=True, normalize=normalize, lam=0.9)
    out = call("ties", tb, tm, weight=weights, density=densities, normalize=normalize,
               lambda_=0.9)
    check(out, expected, dtype)


def test_ties_keeps_exactly_k_entries_per_model():
    tb, tm, b, m = make((10, 10), 1, torch.float64, seed=4)
    out = call("ties", tb, tm, weight=[1.0], density=[0.37], normalize=True, lambda_=1.0)
    assert int(((out - tb) != 0).sum()) == 37


def test_ties_sign_election_hand_computed():
    """Weighted election, ties going to +, divisor = sum of agreeing weights."""
    base = torch.zeros(4, dtype=torch.float64)
    m1 = torch.tensor([0.5, 1.0, 2.0, -1.0], dtype=torch.float64)
    m2 = torch.tensor([-0.5, 0.5, -1.0, 3.0], dtype=torch.float64)
    w = [1.0, 1.0]
    out = call("ties", base, [m1, m2], weight=w, density=[1.0, 1.0], normalize=True,
               lambda_=1.0)
    # entry 0: weighted sum 0 -> elected +, only m1 agrees: 0.5 / 1
    # entry 1: both agree: (1.0 + 0.5) / 2;  entry 2: + wins, 2.0 / 1;  entry 3: + wins, 3 / 1
    torch.testing.assert_close(out, torch.tensor([0.5, 0.75, 2.0, 3.0], dtype=torch.float64))
    # a negative weight flips the vote: w2 * m2 = [0.5, -0.5, 1, -3]
    out = call("ties", base, [m1, m2], weight=[1.0, -1.0], density=[1.0, 1.0],
               normalize=True, lambda_=1.0)
    # entry 0: votes +0.5 +0.5 -> both agree, (0.5 + 0.5) / (1 - 1 -> 0 -> 1) = 1.0
    # entry 1: votes +1.0 -0.5 -> +, only m1: 1.0 / 1
    # entry 2: votes +2 +1 -> +, both: 3 / (1 - 1 -> 1) = 3
    # entry 3: votes -1 -3 -> -, both: -4 / 1 = -4
    torch.testing.assert_close(out, torch.tensor([1.0, 1.0, 3.0, -4.0], dtype=torch.float64))
    # weights 1 and 3, both positive: divisor is the sum of agreeing weights only
    out = call("ties", base, [m1, m2], weight=[1.0, 3.0], density=[1.0, 1.0],
               normalize=True, lambda_=1.0)
    # entry 0: votes 0.5, -1.5 -> -, only m2: -1.5 / 3;  entry 1: (1 + 1.5) / 4
    # entry 2: votes 2, -3 -> -, only m2: -3 / 3;  entry 3: votes -1, 9 -> +, 9 / 3
    torch.testing.assert_close(out, torch.tensor([-0.5, 0.625, -1.0, 3.0], dtype=torch.float64))


# --------------------------------------------------------------- breadcrumbs
BAND_CASES = [
    ([0.5, 0.5], [0.1, 0.1]),
    ([0.3, 0.6], [0.0, 0.05]),
    ([0.9, 0.8], [0.2, 0.3]),  # keep + top > n: the top shrinks (n_bottom = 0)
    ([0.01, 0.4], [0.01, 0.2]),  # int(0.01 * 56) = 0: the first delta is dropped entirely
    ([1.0, 0.45], [0.3, 0.15]),  # density 1 keeps everything, outliers too
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, consensus", [("breadcrumbs", False), ("breadcrumbs_ties", True)])
@pytest.mark.parametrize("densities, gammas", BAND_CASES)
@pytest.mark.parametrize("normalize", [False, True])
def test_breadcrumbs(dtype, name, consensus, densities, gammas, normalize):
    tb, tm, b, m = make((8, 7), 2, dtype, seed=5)
    w = [0.6, 1.3]
    deltas = [ref_band(mi - b, d, g) for mi, d, g in zip(m, densities, gammas, strict=True)]
    expected = ref_combine(b, deltas, w, consensus=consensus, normalize=normalize, lam=1.1)
    out = call(name, tb, tm, weight=w, density=densities, gamma=gammas, normalize=normalize,
               lambda_=1.1)
    check(out, expected, dtype)


def test_breadcrumbs_drops_top_and_bottom():
    base = torch.zeros(100, dtype=torch.float64)
    model = torch.arange(1, 101, dtype=torch.float64)  # magnitudes 1..100
    out = call("breadcrumbs", base, [model], weight=[1.0], density=[0.3], gamma=[0.1],
               normalize=False, lambda_=1.0)
    kept = torch.nonzero(out).flatten() + 1
    assert kept.tolist() == list(range(61, 91))  # drop the top 10 and the bottom 60


# --------------------------------------------------------------------- slerp
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(6, 5), (4, 3, 2), (9,), ()], ids=str)
@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
def test_slerp_matches_reference(dtype, shape, t):
    tb, (to,), b, (o,) = make(shape, 1, dtype, seed=6)
    check(call("slerp", tb, [to], t=t), ref_slerp(b, o, t), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 4), (7,)], ids=str)
def test_slerp_endpoints(dtype, shape):
    tb, (to,), _, _ = make(shape, 1, dtype, seed=7)
    torch.testing.assert_close(call("slerp", tb, [to], t=0.0), tb)
    torch.testing.assert_close(call("slerp", tb, [to], t=1.0), to)


def test_slerp_one_angle_per_tensor():
    """The angle is over the whole tensor: the layout does not matter, and equal-norm
    tensors keep their norm (which linear interpolation would shrink)."""
    rng = np.random.default_rng(8)
    a = rng.standard_normal((3, 16))
    b = rng.standard_normal((3, 16))
    b *= np.linalg.norm(a) / np.linalg.norm(b)
    out = call("slerp", torch.tensor(a), [torch.tensor(b)], t=0.4).numpy()
    np.testing.assert_allclose(np.linalg.norm(out), np.linalg.norm(a), rtol=1e-10)
    assert np.linalg.norm(0.6 * a + 0.4 * b) < 0.99 * np.linalg.norm(a)
    flat = call("slerp", torch.tensor(a.ravel()), [torch.tensor(b.ravel())], t=0.4).numpy()
    np.testing.assert_allclose(out.ravel(), flat, rtol=1e-12, atol=1e-14)
    transposed = call("slerp", torch.tensor(a.T.copy()), [torch.tensor(b.T.copy())], t=0.4)
    np.testing.assert_allclose(transposed.numpy().T, out, rtol=1e-12, atol=1e-14)


def _at_cosine(a, cos, rng):
    """A tensor of a's norm at the given cosine to a."""
    x = a.ravel()
    perp = rng.standard_normal(x.size)
    perp -= perp @ x / (x @ x) * x
    y = np.linalg.norm(x) * (cos * x / np.linalg.norm(x)
                             + math.sqrt(1 - cos**2) * perp / np.linalg.norm(perp))
    return y.reshape(a.shape)


@pytest.mark.parametrize("case", ["near", "antiparallel", "parallel"])
def test_slerp_nearly_parallel_tensors_use_linear(case):
    rng = np.random.default_rng(9)
    a = rng.standard_normal((4, 8))
    b = {"near": 2.5 * a + 1e-4 * rng.standard_normal(a.shape),  # cos ~ 1 - 1e-9
         "antiparallel": -2.0 * a,  # the slerp formula would divide by sin(pi) = 0
         "parallel": 3.0 * a}[case]
    t = 0.3
    out = call("slerp", torch.tensor(a), [torch.tensor(b)], t=t).numpy()
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, (1 - t) * a + t * b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cos", [0.999, 0.5, -0.3, -0.999])
def test_slerp_below_threshold_is_spherical(cos):
    rng = np.random.default_rng(10)
    a = rng.standard_normal((4, 8))
    b = _at_cosine(a, cos, rng)
    t = 0.3
    out = call("slerp", torch.tensor(a), [torch.tensor(b)], t=t).numpy()
    theta = math.acos(cos)
    spherical = (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)
    np.testing.assert_allclose(out, spherical, rtol=1e-9, atol=1e-12)
    assert not np.allclose(out, (1 - t) * a + t * b, rtol=1e-7, atol=0)


def test_slerp_zero_base_uses_unit_norm():
    """A (near-)zero tensor is not normalised (norm taken as 1), as in mergekit."""
    a = np.zeros((3, 4))
    b = np.random.default_rng(11).standard_normal((3, 4))
    out = call("slerp", torch.tensor(a), [torch.tensor(b)], t=0.3).numpy()
    np.testing.assert_allclose(out, math.sin(0.3 * math.pi / 2) * b, rtol=1e-12)


# -------------------------------------------------------------- global slerp
def _global_pairs(seed, parallel=False):
    rng = np.random.default_rng(seed)
    shapes = [(4, 3), (5,), (2, 2, 2), (3, 1)]
    a = [rng.standard_normal(s) for s in shapes]
    if parallel:
        b = [1.7 * x for x in a]
    else:
        b = [0.6 * x + 0.8 * rng.standard_normal(x.shape) for x in a]
    return a, b


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", [0.0, 0.25, 0.6, 1.0])
def test_global_slerp(dtype, t):
    a, b = _global_pairs(10)
    ta = [torch.tensor(x, dtype=dtype) for x in a]
    tb = [torch.tensor(x, dtype=dtype) for x in b]
    a = [x.double().numpy() for x in ta]
    b = [x.double().numpy() for x in tb]
    fa = np.concatenate([x.ravel() for x in a])
    fb = np.concatenate([x.ravel() for x in b])
    omega = math.acos(fa @ fb / (np.linalg.norm(fa) * np.linalg.norm(fb)))
    assert 0.3 < omega < 1.5  # a real angle, not a near-linear case
    method = get_method("global_slerp")
    extra = method.prepare((x, [y]) for x, y in zip(ta, tb, strict=True))  # one pass suffices
    assert extra["omega"] == pytest.approx(omega, rel=1e-6 if dtype == torch.float32 else 1e-12)
    for x, y, nx, ny in zip(ta, tb, a, b, strict=True):
        out = method.fn(x, [y], seed=0, t=t, **extra)
        expected = (math.sin((1 - t) * omega) * nx + math.sin(t * omega) * ny) / math.sin(omega)
        check(out, expected, dtype)


def test_global_slerp_angle_is_global_not_per_tensor():
    a, b = _global_pairs(11)
    method = get_method("global_slerp")
    pairs = [(torch.tensor(x), [torch.tensor(y)]) for x, y in zip(a, b, strict=True)]
    whole = method.prepare(pairs)["omega"]
    first = method.prepare(pairs[:1])["omega"]
    assert whole != pytest.approx(first)


def test_global_slerp_parallel_falls_back_to_linear():
    a, b = _global_pairs(12, parallel=True)
    method = get_method("global_slerp")
    pairs = [(torch.tensor(x), [torch.tensor(y)]) for x, y in zip(a, b, strict=True)]
    extra = method.prepare(pairs)
    assert math.sin(extra["omega"]) <= 1e-6
    for (x, (y,)), nx, ny in zip(pairs, a, b, strict=True):
        out = method.fn(x, [y], seed=0, t=0.3, **extra)
        assert torch.isfinite(out).all()
        np.testing.assert_allclose(out.numpy(), 0.7 * nx + 0.3 * ny, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------- passthrough
@pytest.mark.parametrize("dtype", DTYPES)
def test_passthrough(dtype):
    _, (tm,), _, (m,) = make((5, 3), 1, dtype, seed=13)
    check(call("passthrough", None, [tm]), m, dtype)


# ------------------------------------------------------- stochastic methods
STOCHASTIC = ["dare_ties", "dare_linear", "della", "della_linear"]
CONSENSUS = {"dare_ties": True, "dare_linear": False, "della": True, "della_linear": False}


def _sparse_kwargs(name, n, density=0.4, rescale=True, normalize=False):
    kw = dict(weight=[1.0] * n, density=[density] * n, rescale=rescale, normalize=normalize,
              lambda_=1.0)
    if name.startswith("della"):
        kw["epsilon"] = [0.2] * n
    return kw


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_seeded(name):
    tb, tm, _, _ = make((32, 32), 2, torch.float32, seed=14)
    kw = _sparse_kwargs(name, 2)
    first = call(name, tb, tm, seed=123, **kw)
    assert torch.equal(first, call(name, tb, tm, seed=123, **kw))
    assert not torch.equal(first, call(name, tb, tm, seed=124, **kw))


def _one_delta(shape, seed, dtype=torch.float64):
    """Base zero, so the output is exactly the kept (and rescaled) task vector."""
    rng = np.random.default_rng(seed)
    tau = rng.standard_normal(shape)
    return torch.zeros(shape, dtype=dtype), torch.tensor(tau, dtype=dtype)


@pytest.mark.parametrize("name", ["dare_ties", "dare_linear"])
@pytest.mark.parametrize("density", [0.1, 0.35, 0.8])
def test_dare_keep_rate_and_rescale(name, density):
    base, tau = _one_delta((100, 400), seed=15)
    n = tau.numel()
    out = call(name, base, [tau], seed=7, **_sparse_kwargs(name, 1, density, rescale=True))
    kept = out != 0
    sigma = math.sqrt(density * (1 - density) / n)
    assert abs(kept.double().mean().item() - density) < 5 * sigma
    torch.testing.assert_close(out[kept], tau[kept] / density, rtol=1e-15, atol=0)
    # the same draw without rescaling leaves survivors as they were
    plain = call(name, base, [tau], seed=7, **_sparse_kwargs(name, 1, density, rescale=False))
    assert torch.equal(plain != 0, kept)
    assert torch.equal(plain[kept], tau[kept])


def test_dare_per_model_density():
    base, tau = _one_delta((100, 200), seed=16)
    for densities, idx in (([0.2, 0.9], 0), ([0.2, 0.9], 1)):
        models = [base.clone(), base.clone()]
        models[idx] = tau  # the other model has a zero task vector
        out = call("dare_linear", base, models, seed=3, weight=[1.0, 1.0], density=densities,
                   rescale=True, normalize=False, lambda_=1.0)
        kept = out != 0
        d = densities[idx]
        assert abs(kept.double().mean().item() - d) < 5 * math.sqrt(d * (1 - d) / tau.numel())
        torch.testing.assert_close(out[kept], tau[kept] / d, rtol=1e-15, atol=0)


@pytest.mark.parametrize("shape", [(100, 400), (40000,)])
@pytest.mark.parametrize("name", ["della", "della_linear"])
def test_della_rescale_by_keep_probability(name, shape):
    base, tau = _one_delta(shape, seed=17)
    density, eps = 0.5, 0.3
    kw = dict(weight=[1.0], density=[density], epsilon=[eps], normalize=False, lambda_=1.0)
    out = call(name, base, [tau], seed=5, rescale=True, **kw)
    kept = (out != 0).numpy()
    prob = ref_della_prob(tau.numpy(), density, eps)
    np.testing.assert_allclose(out.numpy()[kept], tau.numpy()[kept] / prob[kept], rtol=1e-12)
    plain = call(name, base, [tau], seed=5, rescale=False, **kw)
    np.testing.assert_array_equal(plain.numpy() != 0, kept)
    np.testing.assert_array_equal(plain.numpy()[kept], tau.numpy()[kept])
    # overall keep rate is the mean probability, density
    sigma = math.sqrt(density * (1 - density) / tau.numel())
    assert abs(kept.mean() - density) < 5 * sigma


def test_della_keeps_large_magnitudes_more_often():
    base, tau = _one_delta((100, 1000), seed=18)
    density, eps = 0.5, 0.3
    out = call("della_linear", base, [tau], seed=9, weight=[1.0], density=[density],
               epsilon=[eps], rescale=True, normalize=False, lambda_=1.0)
    kept = (out != 0).numpy()
    prob = ref_della_prob(tau.numpy(), density, eps)
    # per decile of within-row magnitude rank, the keep rate follows the probability
    rank = np.argsort(np.argsort(np.abs(tau.numpy()), axis=1), axis=1)
    decile = rank * 10 // tau.shape[1]
    rates = []
    for q in range(10):
        sel = decile == q
        p = prob[sel].mean()
        rate = kept[sel].mean()
        assert abs(rate - p) < 5 * math.sqrt(p * (1 - p) / sel.sum()), q
        rates.append(rate)
    assert rates[-1] > rates[0] + 0.4  # ~0.77 vs ~0.23
    assert all(x < y for x, y in zip(rates, rates[1:], strict=False))


def _hash_uniform(n, seed, i):
    """Model i's uniform draws for a tensor seed: the stateless hash DARE also uses."""
    from mergesearch.merging.sparsify import mix_seed, uniform_bits

    key = mix_seed(seed * 1_000_003 + i * 7919)
    bits = uniform_bits(torch.arange(n), key).numpy()
    return (bits >> 8) / 2.0**24


@pytest.mark.parametrize("name", ["della", "della_linear"])
def test_della_mask_comes_from_the_seeded_hash(name):
    tb, tm, b, m = make((30, 20), 2, torch.float64, seed=22)
    w, dens, eps = [0.6, 1.3], [0.4, 0.7], [0.2, 0.25]
    kw = dict(weight=w, density=dens, epsilon=eps, rescale=True, normalize=False, lambda_=1.0)
    out = call(name, tb, tm, seed=31, **kw).numpy()
    deltas = []
    for i, (mi, d, e) in enumerate(zip(m, dens, eps, strict=True)):
        tau = mi - b
        prob = ref_della_prob(tau, d, e)
        keep = _hash_uniform(tau.size, 31, i).reshape(tau.shape) < prob
        deltas.append(np.where(keep, tau / prob, 0.0))
    want = ref_combine(b, deltas, w, consensus=CONSENSUS[name], normalize=False, lam=1.0)
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", STOCHASTIC)
def test_random_masks_use_no_torch_generator(name, monkeypatch):
    """Masks do not depend on torch's random state, global or per device."""
    tb, tm, _, _ = make((16, 24), 2, torch.float32, seed=23)
    kw = _sparse_kwargs(name, 2)
    torch.manual_seed(123)
    first = call(name, tb, tm, seed=5, **kw)
    torch.manual_seed(7)
    assert torch.equal(call(name, tb, tm, seed=5, **kw), first)

    def refuse(*args, **kwargs):
        raise AssertionError("a merge drew from a torch generator")

    for fn in ("rand", "rand_like", "randn", "randint", "bernoulli", "Generator"):
        monkeypatch.setattr(torch, fn, refuse)
    assert torch.equal(call(name, tb, tm, seed=5, **kw), first)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", STOCHASTIC)
def test_random_masks_are_the_same_on_cpu_and_gpu(name):
    tb, tm, _, _ = make((64, 96), 2, torch.float32, seed=24)
    kw = _sparse_kwargs(name, 2)
    on_cpu = call(name, tb, tm, seed=8, **kw)
    on_gpu = call(name, tb.cuda(), [t.cuda() for t in tm], seed=8, **kw).cpu()
    assert torch.equal(on_cpu != tb, on_gpu != tb)  # the same entries kept
    torch.testing.assert_close(on_gpu, on_cpu)


def test_della_rejects_epsilon_past_density():
    base, tau = _one_delta((4, 4), seed=19)
    with pytest.raises(ValueError, match="epsilon"):
        call("della", base, [tau], seed=0, weight=[1.0], density=[0.1], epsilon=[0.15],
             rescale=True, normalize=True, lambda_=1.0)


@pytest.mark.parametrize("name", STOCHASTIC)
@pytest.mark.parametrize("normalize", [False, True])
def test_stochastic_outputs_are_a_combination_of_surviving_deltas(name, normalize):
    """Every entry equals the reference merge for one subset of surviving task vectors.

    With two models, each entry is one of four candidates (none, only 1, only 2,
    both survive), each computed here from the reference combine with survivors
    rescaled by their keep probability.  For the linear variants the candidates
    are distinct, so the subset frequencies must match the keep probabilities.
    """
    tb, tm, b, m = make((40, 50), 2, torch.float64, seed=20)
    w = [0.7, 1.4]
    dens = [0.3, 0.6]
    kw = dict(weight=w, density=dens, rescale=True, normalize=normalize, lambda_=0.8)
    della = name.startswith("della")
    if della:
        kw["epsilon"] = [0.2, 0.25]
    out = call(name, tb, tm, seed=11, **kw).numpy()
    taus = [mi - b for mi in m]
    probs = [ref_della_prob(tau, d, e) if della else np.full(tau.shape, d)
             for tau, d, e in zip(taus, dens, kw.get("epsilon", [0, 0]), strict=True)]
    subsets = list(itertools.product([False, True], repeat=2))
    candidates = np.stack([
        ref_combine(b, [tau / p if s else np.zeros_like(tau)
                        for tau, p, s in zip(taus, probs, subset, strict=True)],
                    w, consensus=CONSENSUS[name], normalize=normalize, lam=0.8)
        for subset in subsets
    ])
    match = np.isclose(out[None], candidates, rtol=1e-10, atol=1e-12)
    assert match.any(axis=0).all()
    if not CONSENSUS[name]:
        assert (match.sum(axis=0) == 1).all()
        which = match.argmax(axis=0)
        n = out.size
        for k, (s1, s2) in enumerate(subsets):
            p = ((probs[0] if s1 else 1 - probs[0]) * (probs[1] if s2 else 1 - probs[1])).mean()
            rate = (which == k).mean()
            assert abs(rate - p) < 5 * math.sqrt(p * (1 - p) / n), (s1, s2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize", [False, True])
def test_density_one_reduces_to_deterministic_methods(dtype, normalize):
    tb, tm, _, _ = make((12, 9), 3, dtype, seed=21)
    common = dict(weight=[0.5, 1.2, -0.3], density=[1.0] * 3, normalize=normalize, lambda_=0.9)
    ties = call("ties", tb, tm, **common)
    ta = call("task_arithmetic", tb, tm, weight=common["weight"], normalize=normalize,
              lambda_=0.9)
    assert torch.equal(call("dare_ties", tb, tm, seed=1, rescale=True, **common), ties)
    assert torch.equal(call("della", tb, tm, seed=1, rescale=True, epsilon=[0.1] * 3, **common),
                       ties)
    assert torch.equal(call("dare_linear", tb, tm, seed=1, rescale=True, **common), ta)
    assert torch.equal(
        call("della_linear", tb, tm, seed=1, rescale=True, epsilon=[0.1] * 3, **common), ta)
    assert torch.equal(call("breadcrumbs_ties", tb, tm, gamma=[0.2] * 3, **common), ties)
    assert torch.equal(call("breadcrumbs", tb, tm, gamma=[0.2] * 3, **common), ta)


def test_global_slerp_of_one_tensor_is_slerp():
    a, b = _global_pairs(12)
    x, y = torch.tensor(a[0]), torch.tensor(b[0])
    method = get_method("global_slerp")
    out = method.fn(x, [y], seed=0, t=0.35, **method.prepare([(x, [y])]))
    torch.testing.assert_close(out, call("slerp", x, [y], t=0.35), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("density, gamma, kind", [(0.3, 0.05, "normal"), (0.001, 0.0, "ranks"),
                                                  (0.999, 0.0005, "normal"), (0.6, 0.5, "ranks")])
def test_magnitude_selection_on_a_large_tensor(density, gamma, kind):
    """Past 2**18 entries the k-th magnitude may be found by sampling; it must stay exact."""
    rng = np.random.default_rng(22)
    shape = (520, 512)
    if kind == "normal":
        tau = rng.standard_normal(shape)
    else:  # distinct magnitudes 1..n in random places, random signs
        tau = rng.permutation(np.arange(1.0, 1.0 + tau_size(shape))).reshape(shape)
        tau *= rng.choice([-1.0, 1.0], size=shape)
    base = torch.zeros(shape, dtype=torch.float64)
    common = dict(weight=[1.0], density=[density], normalize=False, lambda_=1.0)
    out = call("ties", base, [torch.tensor(tau)], **common)
    np.testing.assert_array_equal(out.numpy(), ref_topk(tau, density))
    out = call("breadcrumbs", base, [torch.tensor(tau)], gamma=[gamma], **common)
    np.testing.assert_array_equal(out.numpy(), ref_band(tau, density, gamma))


def tau_size(shape):
    return int(np.prod(shape))
