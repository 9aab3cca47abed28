"""BMM's inner merge and RegMean against independent computations: the ridge closed form
against a stacked least-squares solve, RegMean on a small nn.Linear model against Grams
and a solve computed here from its real activations, and both through the merge engine
on a tiny Llama with a calibration store on the merger's context."""

from __future__ import annotations

import pytest
import torch
from helpers import VOCAB, perturbed, save, tiny_config
from torch import nn
from transformers import LlamaForCausalLM

import mergesearch.merging.bmm as bmm  # registers bmm, regmean until merging/__init__ does
from mergesearch.execution.calibration import CalibrationStore, input_grams, linear_weights
from mergesearch.merging import get_method
from mergesearch.merging.bmm import INPUT_GRAM, bmm_merge, regmean_merge
from mergesearch.merging.context import MergeContext, TensorContext
from mergesearch.models.resident import ResidentMerger
from mergesearch.recipe import Recipe


def stacked_ridge(xs, ws, anchor, lam):
    """argmin_W sum_t ||X_t W^T - X_t W_t^T||^2 + lam ||W - W_a||^2 by one lstsq over the
    stacked rows [X_1; ...; sqrt(lam) I]."""
    n_in = ws[0].shape[1]
    a = torch.cat([*xs, lam ** 0.5 * torch.eye(n_in, dtype=torch.float64)])
    b = torch.cat([*(x @ w.T for x, w in zip(xs, ws, strict=True)), lam ** 0.5 * anchor.T])
    return torch.linalg.lstsq(a, b).solution.T


class Grams:
    """A context over fixed Grams: ``(source, tensor) -> G``."""

    def __init__(self, grams: dict[tuple[str, str], torch.Tensor]):
        self.context = MergeContext(lambda s, t: None)
        self.context.provide(INPUT_GRAM, lambda s, t: grams.get((s, t)))
        self.sources = sorted({s for s, _ in grams})

    def tensor(self, name: str) -> TensorContext:
        return TensorContext(self.context, name, ("base", name),
                             tuple((s, name) for s in self.sources))


def problem(seed=0, n=3, out=5, n_in=4, rows=7):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(out, n_in, generator=g, dtype=torch.float64)
    ws = [base + torch.randn(out, n_in, generator=g, dtype=torch.float64) for _ in range(n)]
    xs = [torch.randn(rows, n_in, generator=g, dtype=torch.float64) for _ in range(n)]
    return base, ws, xs


@pytest.mark.parametrize("lam_rel", [0.0, 0.3, 5.0])
@pytest.mark.parametrize("ties", [False, True])
def test_inner_closed_form_is_the_stacked_least_squares_solution(lam_rel, ties):
    base, ws, xs = problem()
    ctx = Grams({(f"s{i}", "w"): x.T @ x for i, x in enumerate(xs)})
    weight, density = [0.7, 0.4, 1.1], [0.5, 0.8, 0.6]
    got = bmm_merge(base, ws, lambda_=lam_rel, scale=1.0, ties=ties, weight=weight,
                    density=density, context=ctx.tensor("w"))
    if ties:
        anchor = get_method("ties").fn(base, ws, weight=weight, density=density,
                                       normalize=False, lambda_=1.0)
    else:
        anchor = base + sum(w_ * (m - base) for w_, m in zip(weight, ws, strict=True))
    # lambda is relative: in units of the mean eigenvalue of sum_t X_t^T X_t
    # each source's rows count by its weight: sqrt(w_t) X_t in the stacked problem
    xs = [w_ ** 0.5 * x for w_, x in zip(weight, xs, strict=True)]
    lam = lam_rel * sum(float((x * x).sum()) for x in xs) / base.shape[1]
    want = stacked_ridge(xs, ws, anchor, lam)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_scale_scales_the_merged_change_and_large_lambda_gives_the_anchor():
    base, ws, xs = problem(1)
    ctx = Grams({(f"s{i}", "w"): x.T @ x for i, x in enumerate(xs)})
    one = bmm_merge(base, ws, lambda_=0.5, scale=1.0, context=ctx.tensor("w"))
    half = bmm_merge(base, ws, lambda_=0.5, scale=0.5, context=ctx.tensor("w"))
    torch.testing.assert_close(half - base, 0.5 * (one - base))
    far = bmm_merge(base, ws, lambda_=1e9, weight=[0.5] * 3, context=ctx.tensor("w"))
    torch.testing.assert_close(far, base + 0.5 * sum(m - base for m in ws), rtol=0, atol=1e-6)
    # a source of negative weight has no say in the fit (lambda 0: RegMean of the others)
    fit = bmm_merge(base, ws, lambda_=0.0, weight=[1.0, 1.0, -0.5], context=ctx.tensor("w"))
    torch.testing.assert_close(fit, stacked_ridge(xs[:2], ws[:2], base, 0.0))


def test_log_lambda_weighted_targets_and_normalised_grams_against_the_stacked_solve():
    base, ws, xs = problem(3)
    ctx = Grams({(f"s{i}", "w"): x.T @ x for i, x in enumerate(xs)})
    weight = [0.8, 0.3, 0.6]
    anchor = base + sum(w_ * (m - base) for w_, m in zip(weight, ws, strict=True))
    # lambda_log2: the ridge strength times 2 ** it (0.5 * 2 ** 3 = 4)
    got = bmm_merge(base, ws, lambda_=0.5, lambda_log2=3.0, weight=weight,
                    context=ctx.tensor("w"))
    torch.testing.assert_close(
        got, bmm_merge(base, ws, lambda_=4.0, weight=weight, context=ctx.tensor("w")))
    # weighted targets: each source's rows fit base + w_t tau_t instead of W_t
    rows = [w_ ** 0.5 * x for w_, x in zip(weight, xs, strict=True)]
    lam = 0.7 * sum(float((x * x).sum()) for x in rows) / base.shape[1]
    targets = [base + w_ * (m - base) for w_, m in zip(weight, ws, strict=True)]
    got = bmm_merge(base, ws, lambda_=0.7, weight=weight, weighted_targets=True,
                    context=ctx.tensor("w"))
    torch.testing.assert_close(got, stacked_ridge(rows, targets, anchor, lam),
                               rtol=1e-9, atol=1e-9)
    # ... so with lambda 0 and inputs in separate coordinates, the fit is task arithmetic
    split = Grams({(f"s{i}", "w"): torch.diag(torch.eye(3, 4, dtype=torch.float64)[i] * 5)
                   for i in range(3)})
    taus = [torch.zeros(5, 4, dtype=torch.float64) for _ in range(3)]
    for i, t in enumerate(taus):
        t[:, i] = torch.arange(1.0, 6.0) * (i + 1)
    sep = [base + t for t in taus]
    fit = bmm_merge(base, sep, lambda_=0.0, weight=weight, weighted_targets=True,
                    context=split.tensor("w"))
    want = base + sum(w_ * t for w_, t in zip(weight, taus, strict=True))
    torch.testing.assert_close(fit[:, :3], want[:, :3])
    # skip_unchanged: a source equal to the base on this tensor has no say in its fit
    still = [ws[0], ws[1], base.clone()]
    got = bmm_merge(base, still, lambda_=0.7, weight=weight, skip_unchanged=True,
                    context=ctx.tensor("w"))
    anchor2 = base + sum(w_ * (m - base) for w_, m in zip(weight, still, strict=True))
    rows2 = [w_ ** 0.5 * x for w_, x in zip(weight[:2], xs[:2], strict=True)]
    lam2 = 0.7 * sum(float((x * x).sum()) for x in rows2) / base.shape[1]
    torch.testing.assert_close(got, stacked_ridge(rows2, still[:2], anchor2, lam2),
                               rtol=1e-9, atol=1e-9)
    # gram_norm: every source's Gram to mean eigenvalue 1 before its weight
    scaled = Grams({(f"s{i}", "w"): (10.0 ** i) * x.T @ x for i, x in enumerate(xs)})
    normed = [x / (float((x * x).sum()) / base.shape[1]) ** 0.5 for x in xs]
    rows = [w_ ** 0.5 * x for w_, x in zip(weight, normed, strict=True)]
    lam = 0.7 * sum(float((x * x).sum()) for x in rows) / base.shape[1]
    got = bmm_merge(base, ws, lambda_=0.7, weight=weight, gram_norm=True,
                    context=scaled.tensor("w"))
    torch.testing.assert_close(got, stacked_ridge(rows, ws, anchor, lam),
                               rtol=1e-9, atol=1e-9)


def test_alpha_shrinks_the_off_diagonal_grams_in_the_fit():
    base, ws, xs = problem(4)
    ctx = Grams({(f"s{i}", "w"): x.T @ x for i, x in enumerate(xs)})
    weight = [0.9, 0.2, 0.5]
    anchor = base + sum(w_ * (m - base) for w_, m in zip(weight, ws, strict=True))
    got = bmm_merge(base, ws, lambda_=0.4, weight=weight, alpha=0.3, context=ctx.tensor("w"))
    # the normal equations written out, with each Gram's off-diagonal entries times 0.3
    gs = []
    for w_, x in zip(weight, xs, strict=True):
        g = x.T @ x
        off = g - torch.diag(torch.diagonal(g))
        gs.append(w_ * (g - 0.7 * off))
    lam = 0.4 * float(sum(torch.trace(g) for g in gs)) / base.shape[1]
    lhs = sum(gs) + lam * torch.eye(base.shape[1], dtype=torch.float64)
    rhs = sum(m @ g for m, g in zip(ws, gs, strict=True)) + lam * anchor
    torch.testing.assert_close(got, torch.linalg.solve(lhs, rhs.T).T, rtol=1e-9, atol=1e-9)
    # alpha 0: only the diagonals count, so each output column fits on its own
    diag = bmm_merge(base, ws, lambda_=0.0, weight=weight, alpha=0.0, context=ctx.tensor("w"))
    d = [w_ * (x * x).sum(0) for w_, x in zip(weight, xs, strict=True)]
    torch.testing.assert_close(diag, sum(m * e for m, e in zip(ws, d, strict=True)) / sum(d))


def test_data_free_grams_are_the_task_vectors_own():
    base, ws, _ = problem(2, out=6)
    taus = [w - base for w in ws]
    got = bmm_merge(base, ws, lambda_=0.2, activations=False, weight=[0.5] * 3)
    anchor = base + 0.5 * sum(taus)
    lam = 0.2 * sum(float((t * t).sum()) for t in taus) / base.shape[1]
    torch.testing.assert_close(got, stacked_ridge(taus, ws, anchor, lam), rtol=1e-9, atol=1e-9)
    # not a linear weight (an embedding table, a norm): the anchor, scaled
    ctx = Grams({("s0", "x"): torch.eye(4)})
    emb = TensorContext(ctx.context, "model.embed_tokens.weight", None, ())
    torch.testing.assert_close(
        bmm_merge(base, ws, activations=False, weight=[0.5] * 3, scale=2.0, context=emb),
        base + 2.0 * (anchor - base))


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).double()


def test_regmean_matches_a_reference_from_real_activations():
    torch.manual_seed(0)
    base = mlp(0)
    sources = {f"m{s}": mlp(0) for s in (1, 2, 3)}
    for s, model in enumerate(sources.values(), 1):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(s),
                                         dtype=p.dtype))
    x = torch.randn(40, 6, dtype=torch.float64)
    store = CalibrationStore(lambda ref: sources[ref], [x[:25], x[25:]])
    state = {ref: m.state_dict() for ref, m in sources.items()} | {"base": base.state_dict()}
    context = MergeContext(lambda ref, name: state[ref][name])
    store.attach(context)
    refs = list(sources)

    def merged(name, alpha=1.0):
        tc = TensorContext(context, name, ("base", name), tuple((r, name) for r in refs))
        return regmean_merge(state["base"][name], [state[r][name] for r in refs], alpha=alpha,
                             context=tc)

    # from scratch: the inputs each Linear sees, per source
    inputs0 = [x for _ in refs]
    inputs2 = [torch.relu(x @ sources[r][0].weight.detach().T + sources[r][0].bias.detach())
               for r in refs]
    for name, xs in (("0.weight", inputs0), ("2.weight", inputs2)):
        ws = [state[r][name] for r in refs]
        want = torch.linalg.lstsq(torch.cat(xs),
                                  torch.cat([a @ w.T for a, w in zip(xs, ws, strict=True)])
                                  ).solution.T
        torch.testing.assert_close(merged(name), want, rtol=1e-8, atol=1e-8)
        # alpha < 1 shrinks the off-diagonal Gram entries
        gs = [0.6 * (a.T @ a) + 0.4 * torch.diag(torch.diagonal(a.T @ a)) for a in xs]
        want = torch.linalg.solve(sum(gs), sum(w @ g for w, g in zip(ws, gs, strict=True)).T).T
        torch.testing.assert_close(merged(name, 0.6), want, rtol=1e-8, atol=1e-8)
    for name in ("0.bias", "2.bias"):  # not linear weights: the average
        torch.testing.assert_close(merged(name), sum(state[r][name] for r in refs) / 3)
    assert store.cost == 3 * 2 and set(store.grams) == set(refs)  # one pass per source


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    root = tmp_path_factory.mktemp("bmm")
    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_config(num_hidden_layers=2))
    return save(base, root / "base"), [save(perturbed(base, s, 0.05), root / f"s{s}")
                                       for s in (1, 2)]


def calibrated_merger(refs, batches):
    merger = ResidentMerger()
    from mergesearch.models.path_model import source_model

    store = CalibrationStore(lambda ref: source_model(merger.pool, ref, torch.float32), batches)
    store.attach(merger.context)
    return merger, store


def test_engine_regmean_and_bmm_on_a_llama(llamas):
    base, sources = llamas
    ids = torch.randint(2, VOCAB, (12, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[8:, 10:] = 0  # padding rows: their inputs do not count
    batches = [{"input_ids": ids, "attention_mask": mask}]
    merger, store = calibrated_merger(sources, batches)
    models = [{"model": s} for s in sources]
    regmean = dict(merger.stream(Recipe.from_dict({"method": "regmean", "base": base,
                                                   "models": models})))
    # which tensors are linear: every projection and the (untied) head, no norms/embeddings
    names = set(linear_weights(LlamaForCausalLM(tiny_config(num_hidden_layers=2))))
    assert "model.layers.1.mlp.down_proj.weight" in names and "lm_head.weight" in names
    assert not any("norm" in n or "embed" in n for n in names)
    assert set(store.grams[sources[0]]) == names and store.cost == 2
    # reference: the inputs of one projection recorded by a hook of our own, padding dropped
    name = "model.layers.1.mlp.down_proj"
    xs, ws = [], []
    for ref in sources:
        model = LlamaForCausalLM.from_pretrained(ref).eval()
        seen: list[torch.Tensor] = []
        model.get_submodule(name).register_forward_pre_hook(
            lambda m, a, seen=seen: seen.append(a[0]))
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        xs.append(seen[0][mask.bool()].double())
        ws.append(model.get_submodule(name).weight.detach().double())
    want = torch.linalg.lstsq(torch.cat(xs), torch.cat([x @ w.T for x, w in
                                                        zip(xs, ws, strict=True)])).solution.T
    torch.testing.assert_close(regmean[f"{name}.weight"].double(), want, rtol=1e-4, atol=1e-5)
    norm = "model.layers.0.input_layernorm.weight"
    sd = [LlamaForCausalLM.from_pretrained(r).state_dict() for r in sources]
    torch.testing.assert_close(regmean[norm], (sd[0][norm] + sd[1][norm]) / 2)
    # bmm with lambda 0 and scale 1 is RegMean on linear weights; elsewhere its anchor
    bmm = dict(merger.stream(Recipe.from_dict({
        "method": "bmm", "base": base, "parameters": {"lambda": 0.0, "weight": 0.5},
        "models": models})))
    torch.testing.assert_close(bmm[f"{name}.weight"], regmean[f"{name}.weight"],
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bmm[norm], regmean[norm])  # weight 0.5 x 2: the average
    assert store.cost == 2  # Grams collected once per source, reused


def test_without_calibration_activation_grams_fall_back_and_say_how_to_get_them(
        llamas, caplog):
    base, sources = llamas
    recipe = Recipe.from_dict({"method": "bmm", "base": base, "models": [
        {"model": s} for s in sources]})
    bmm._warned.clear()
    with caplog.at_level("WARNING", logger="mergesearch.merging.bmm"):
        merged = dict(ResidentMerger().stream(recipe))
    assert "CalibratingWorker" in caplog.text and caplog.text.count("no activation") == 1
    data_free = Recipe.from_dict(recipe.to_dict() | {"parameters": {"activations": False}})
    want = dict(ResidentMerger().stream(data_free))
    name = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(merged[name], want[name])
    sd = [LlamaForCausalLM.from_pretrained(r).state_dict() for r in sources]
    got = dict(ResidentMerger().stream(Recipe.from_dict(recipe.to_dict() | {
        "method": "regmean", "parameters": {}})))
    torch.testing.assert_close(got[name], (sd[0][name] + sd[1][name]) / 2)


def test_input_grams_count_only_unpadded_tokens():
    lin = nn.Linear(3, 2)
    x = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    model = _Masked(lin)
    grams, rows = input_grams(model, [{"x": x, "attention_mask": mask}])
    kept = x[mask.bool()]
    assert rows == 5
    torch.testing.assert_close(grams["lin.weight"], kept.T @ kept)


class _Masked(nn.Module):
    def __init__(self, lin):
        super().__init__()
        self.lin = lin

    def forward(self, x, attention_mask):
        return self.lin(x)


def test_context_providers_answer_and_cache():
    calls = []
    context = MergeContext(lambda s, t: torch.ones(2))
    assert not context.provides("seen") and context.provides("norm")
    context.provide("seen", lambda s, t: calls.append((s, t)) or len(calls))
    assert context.provides("seen")
    assert context.stat("seen", "a", "x") == 1 and context.stat("seen", "a", "x") == 1
    assert context.stat("seen", "b", "x") == 2 and calls == [("a", "x"), ("b", "x")]
    context.provide("seen", lambda s, t: -1)  # a new provider forgets the old answers
    assert context.stat("seen", "a", "x") == -1
    with pytest.raises(KeyError, match="seen"):
        context.stat("nope", "a", "x")
