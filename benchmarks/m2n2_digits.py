"""M2N2 on the digits testbed (the paper's reference problem), plus its archive's diversity
on the zoo and the hard zoo.

Legs (``--legs``, comma-separated):

* ``scratch``: ``experiments/digits/m2n2_scratch.yaml`` through ``mergesearch run`` (the CLI's
  ``main``, in this process), one study per seed under ``--work``; a study already there
  is resumed, so a cut-short run continues.  Figures: the best training accuracy after
  each budget in ``--budgets`` and the test accuracy of the best training trial (its
  recipe merged by the engine, scored on the test images), with the throughput
  (candidates/s) and where a candidate's time goes (merge, evaluate, the rest).
  ``--engine lean`` runs the same strategy and options in this process instead (see
  ``ablation``), up to ``--budget`` passes or ``--max-seconds`` of wall time per seed.
* ``cmaes``: the CMA-ES baseline at the same number of passes, through ``mergesearch run``:
  the ``cmaes`` strategy, **separable** (pycma ``CMA_diagonal: true``), popsize 20, over
  the layer-wise linear weights of the same twenty untrained MLPs (40 dimensions, bounds
  [-2, 2]).  Not the paper's baseline: that is full-covariance CMA-ES over the 19,210
  flattened weights (~3 GB, hours here; no space of raw weights exists in mergesearch).
* ``ablation``: from the two pretrained halves, M2N2 vs ``attraction: false`` vs
  ``split: false``, ``--ablation-budget`` passes (the paper: 10k) over ``--seeds``.
  ``--engine cli`` runs each through ``mergesearch run``; ``--engine lean`` (default)
  drives the same strategy in this process and scores each recipe by rebuilding its
  weights with numpy from the ``regions`` entries (what the engine computes, checked in
  tests/merging/test_regions.py), which skips the controller and storage: ~20x faster on
  this shared machine.
* ``diversity``: ``experiments/zoo/m2n2.yaml`` and ``experiments/hard/m2n2.yaml`` through
  ``mergesearch run`` (or, with ``--league DIR``, the league table's seed-0 studies); the
  strategy is rebuilt from each study's saved state and, after every told child,
  the archive's best per-skill score is read from the trials: a table of the per-skill
  best in the archive over time (and the best single member's mean).

Output: markdown on stdout (ready for benchmarks/RESULTS.md), progress on stderr, and
``--json`` the figures.

    python benchmarks/m2n2_digits.py --legs scratch,cmaes,ablation,diversity
        [--seeds 0,1] [--budget 50000] [--budgets 1000,5000,10000,25000,50000]
        [--ablation-budget 10000] [--engine lean|cli] [--max-seconds S]
        [--work /tmp/m2n2-bench]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import mergesearch.strategies.m2n2 as m2n2  # noqa: E402  (registers m2n2 and regions)

log = logging.getLogger("m2n2_digits")
PAPER = {"scratch": 0.87, "cmaes": 0.86, "m2n2": 0.685, "no_attraction": 0.66,
         "no_split": 0.58}
VARIANTS = {"m2n2": {}, "no_attraction": {"attraction": False}, "no_split": {"split": False}}


# -- running through the CLI ---------------------------------------------------------------

def cli_run(path: Path, out: Path, seed: int, budget: int, extra: list[str] = ()) -> str:
    """``mergesearch run`` on ``path`` into ``out`` (resumed when a study is there); the
    storage URL."""
    from mergesearch.cli import main

    db = out / "study.db"
    args = ["run", str(path), "-q", "--set", f"output={out}", "--set", f"seed={seed}",
            "--set", f"budget.evaluations={budget}", *extra]
    if db.exists():
        args.append("--resume")
    code = main(args)
    if code != 0:
        raise SystemExit(f"mergesearch run {path} exited {code}")
    return f"sqlite:///{db}"


def study(url: str):
    from mergesearch.storage import TrialStore

    name = TrialStore.studies(url)[0] if hasattr(TrialStore, "studies") else None
    if name is None:
        import optuna

        name = optuna.study.get_all_study_summaries(url)[0].study_name
    return TrialStore.open(url, name)


def test_accuracy(recipe: dict[str, Any], url: str | None = None) -> float:
    """The recipe merged by the engine, scored on the test images.  A lineage recipe whose
    members this process has not published is merged after rebuilding the study's
    strategy from its saved state (``url``), which publishes them."""
    from mergesearch.merging.regions import LineageError
    from mergesearch.models.resident import merge
    from mergesearch.recipe import Recipe
    from mergesearch.zoo import digits

    try:
        model = merge(Recipe.from_dict(recipe), loader="mergesearch.zoo.digits:load")
    except LineageError:
        if url is None:
            raise
        import sqlite3

        from mergesearch.storage import TrialStore

        con = sqlite3.connect(f"file:{url.removeprefix('sqlite:///')}?mode=ro", uri=True)
        (name,) = con.execute("select study_name from studies where study_name not like "
                              "'%.probes'").fetchone()
        # replays its asks, which publishes the lineage (digits: one objective, accuracy)
        rebuilt(TrialStore.open(url, name), ["accuracy"])
        model = merge(Recipe.from_dict(recipe), loader="mergesearch.zoo.digits:load")
    return float(digits.evaluate(model, "test")["scores"]["digits"]["accuracy"])


def curve(trials: list, budgets: list[int]) -> dict[int, float]:
    ok = sorted((t for t in trials if t.state == "ok"), key=lambda t: t.candidate_id)
    values = np.array([t.values["accuracy"] for t in ok])
    return {b: float(values[:b].max()) for b in budgets if len(values) >= b}


def summarise(url: str, budgets: list[int]) -> dict[str, Any]:
    """The figures of one digits study, read straight from its SQLite file: the values,
    timings and metadata columns, and the best trial's recipe only (``TrialStore.trials``
    parses every trial's attributes, minutes for 10k trials on a loaded machine)."""
    import sqlite3
    from datetime import datetime

    db = url.removeprefix("sqlite:///")
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    rows = con.execute(
        "select t.trial_id, t.number, v.value, t.datetime_start, t.datetime_complete "
        "from trials t join trial_values v on v.trial_id = t.trial_id "
        "join studies s on s.study_id = t.study_id "
        "where s.study_name not like '%.probes' and t.state = 'COMPLETE' "
        "order by t.number").fetchall()
    values = np.array([r[2] for r in rows])
    best = int(np.argmax(values))  # the earliest on ties

    def attr(key: str) -> list[Any]:
        return [json.loads(v) for (v,) in con.execute(
            "select value_json from trial_user_attributes where key = ?", (key,))]

    (recipe,) = [json.loads(v) for (v,) in con.execute(
        "select value_json from trial_user_attributes where trial_id = ? and key = 'recipe'",
        (rows[best][0],))]
    timings, meta = attr("timings")[20:], attr("meta")
    skip = min(20, len(rows) - 2)
    span = (datetime.fromisoformat(rows[-1][4])
            - datetime.fromisoformat(rows[skip][3])).total_seconds()
    entries = [m["entries"] for m in meta if "entries" in m]
    return {"n": len(values), "curve": {b: float(values[:b].max()) for b in budgets
                                        if len(values) >= b},
            "best_train": float(values[best]), "best_trial": int(rows[best][1]),
            "test": test_accuracy(recipe, url), "per_s": (len(rows) - 1 - skip) / span,
            "merge_s": float(np.mean([t.get("merge", 0.0) for t in timings] or [0.0])),
            "evaluate_s": float(np.mean([t.get("evaluate", 0.0) for t in timings] or [0.0])),
            "entries": float(np.mean(entries)) if entries else None}


def scratch_leg(args) -> list[dict]:
    """From scratch: through ``mergesearch run`` (``--engine cli``, the default here), or the
    same strategy and options in the lean engine (``--engine lean``), which stops at
    ``--budget`` passes or after ``--max-seconds``, whichever comes first."""
    path = ROOT / "experiments/digits/m2n2_scratch.yaml"
    rows = []
    for seed in args.seeds:
        t0 = time.time()
        if (args.engine or "cli") == "lean":
            data = yaml.safe_load(path.read_text())
            models = list(data["models"]["sources"].values())
            row = lean_run(data["strategy"]["options"], seed, args.budget, models,
                           budgets=args.budgets, max_seconds=args.max_seconds)
        else:
            url = cli_run(path, args.work / f"scratch-s{seed}", seed, args.budget)
            row = summarise(url, args.budgets)
        rows.append({"seed": seed, "wall_s": time.time() - t0, "engine": args.engine or "cli",
                     **row})
        log.info("scratch seed %d: %s", seed, rows[-1])
    return rows


def cmaes_leg(args) -> list[dict]:
    data = yaml.safe_load((ROOT / "experiments/digits/m2n2_scratch.yaml").read_text())
    data["name"] = "digits-cmaes-scratch"
    data["space"] = {"method": "linear", "fixed": {"normalize": False}, "parameters": {
        "weight": {"per": "source", "granularity": "layer", "bounds": [-2.0, 2.0],
                   "init": 0.05}}}
    data["strategy"] = {"name": "cmaes", "options": {
        "popsize": 20, "sigma0": 0.25, "cma_options": {"CMA_diagonal": True}}}
    path = args.work / "cmaes_scratch.yaml"
    args.work.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    rows = []
    for seed in args.seeds:
        t0 = time.time()
        url = cli_run(path, args.work / f"cmaes-s{seed}", seed, args.cmaes_budget)
        rows.append({"seed": seed, "wall_s": time.time() - t0, **summarise(url, args.budgets)})
        log.info("cmaes seed %d: %s", seed, rows[-1])
    return rows


# -- the ablation ----------------------------------------------------------------------------

class LeanDigits:
    """Scores ``regions``/``linear`` recipes over the digits models with numpy: the weights
    rebuilt from the entries, one forward pass over the split."""

    def __init__(self, models: list[str]):
        from mergesearch.zoo import digits

        self.names = ["layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias"]
        self.flat = {m: np.concatenate([digits.load(m)[1][n].double().numpy().ravel()
                                        for n in self.names]) for m in models}
        self.shapes = [(256, 64), (256,), (10, 256), (10,)]
        self.data = {s: tuple(t.numpy() for t in digits.load_split(s)) for s in ("train",
                                                                                  "test")}
        self.members: dict[int, np.ndarray] = {}  # lineage members by key (never evicted)

    def weights(self, recipe: dict[str, Any]) -> np.ndarray:
        n = next(iter(self.flat.values())).size
        out = np.zeros(n)
        if recipe["method"] == "linear":
            ws = [e["parameters"]["weight"] for e in recipe["models"]]
            for e, w in zip(recipe["models"], ws, strict=True):
                out += w * self.flat[e["model"]]
            return out / sum(ws)
        for e in recipe["models"]:
            p = e["parameters"]
            lo, hi = int(p.get("start", 0)), int(min(p.get("end", n), n))
            if not p.get("weight", 1.0):
                continue
            if p.get("noise_term"):
                out[lo:hi] += p["weight"] * self.noise(int(p["noise_term"]), recipe)[lo:hi]
            elif p.get("member"):  # a lineage entry: an earlier member, kept by its key
                out[lo:hi] += p["weight"] * self.members[int(p["member"])][lo:hi]
            else:
                out[lo:hi] += p["weight"] * self.flat[e["model"]][lo:hi]
        key = int(recipe.get("parameters", {}).get("key", 0))
        if key:
            self.members[key] = out
        return out

    def noise(self, k: int, recipe: dict[str, Any]) -> np.ndarray:
        """Noise term ``k`` over the whole model, as the regions method draws it per tensor."""
        from mergesearch.merging.regions import noise
        from mergesearch.models.resident import _seed

        return np.concatenate([noise(k, _seed(recipe.get("seed", 0), name),
                                     int(np.prod(shape))).double().numpy()
                               for name, shape in zip(self.names, self.shapes, strict=True)])

    def correct(self, recipe: dict[str, Any] | None, split: str,
                flat: np.ndarray | None = None) -> np.ndarray:
        flat = self.weights(recipe) if flat is None else flat
        parts, at = [], 0
        for shape in self.shapes:
            size = int(np.prod(shape))
            parts.append(flat[at:at + size].reshape(shape))
            at += size
        w0, b0, w1, b1 = (p.astype(np.float32) for p in parts)
        x, y = self.data[split]
        logits = np.maximum(x @ w0.T + b0, 0) @ w1.T + b1
        return logits.argmax(1) == y


LEAN_BUDGETS = (1000, 2500, 5000, 10000, 15000, 20000, 25000, 30000, 40000, 50000)


def lean_run(options: dict[str, Any], seed: int, budget: int,
             models: list[str] | None = None, *, budgets: list[int] | None = None,
             max_seconds: float | None = None) -> dict[str, Any]:
    """The strategy driven in this process on the digits models ``models`` (default the
    two pretrained halves), each recipe scored by :class:`LeanDigits`; ``budget`` passes,
    or fewer when ``max_seconds`` of wall time run out first (``n``: the passes made).
    Figures: the best training accuracy after each of ``budgets`` (those reached) and
    the test accuracy of the best training child."""
    from mergesearch.recipe import Recipe
    from mergesearch.strategies import Dimension, Objective, Problem
    from mergesearch.trial import Result

    models = models or ["low", "high"]
    scorer = LeanDigits(models)

    def decode(x):
        return Recipe.from_dict({"method": "linear", "models": [
            {"model": m, "parameters": {"weight": 1.0}} for m in models]})

    problem = Problem((Dimension("x", 0.0, 1.0, 0.5),), (Objective("accuracy", "maximize"),),
                      decode=decode)
    s = m2n2.M2N2(problem, {"granularity": "rows", **options}, seed=seed)
    done, best, best_flat, values = 0, -1.0, None, []
    t0 = time.time()
    while done < budget:
        if max_seconds is not None and time.time() - t0 >= max_seconds:
            log.info("lean seed %d: out of time at %d passes", seed, done)
            break
        if done and done % 2500 == 0:
            log.info("lean seed %d: %d passes, best train %.4f (%.0f s)", seed, done, best,
                     time.time() - t0)
        for c in s.ask(1):
            recipe = c.recipe.to_dict()
            if c.is_probe:
                s.tell([Result(c.id, payload=lean_probe(scorer, c))])
                continue
            flat = scorer.weights(recipe)
            correct = scorer.correct(None, "train", flat)
            acc = float(correct.mean())
            values.append(acc)
            if acc > best:
                best, best_flat = acc, flat
            s.tell([Result(c.id, {"accuracy": acc}, correct={"digits": correct.tolist()},
                           items={"digits": list(range(len(correct)))})])
            done += 1
            if scorer.members and done % 200 == 0:  # keep the live members only
                live = {m.key for m in [*s.archive, *s._pending_members.values()]}
                scorer.members = {k: v for k, v in scorer.members.items() if k in live}
    wall = time.time() - t0
    if best_flat is None:
        raise SystemExit(f"lean seed {seed}: no pass made in {max_seconds} s")
    return {"n": done, "best_train": best,
            "test": float(scorer.correct(None, "test", best_flat).mean()),
            "curve": {b: float(max(values[:b])) for b in budgets or LEAN_BUDGETS
                      if len(values) >= b},
            "wall_s": wall, "per_s": done / wall if wall > 0 else None}


def lean_probe(scorer: LeanDigits, cand) -> dict[str, Any]:
    layout = [[n, list(sh), int(n.split(".")[1])] for n, sh in zip(scorer.names,
                                                                   scorer.shapes,
                                                                   strict=True)]
    cuts = m2n2.units(layout, cand.meta["granularity"], cand.meta["block"])
    x = np.stack([scorer.flat[m.model] for m in cand.recipe.models])
    iu = np.triu_indices(len(x))
    return {"tensors": layout, "models": [m.model for m in cand.recipe.models],
            "granularity": cand.meta["granularity"], "block": cand.meta["block"],
            "gram": [(x[:, a:b] @ x[:, a:b].T)[iu].tolist() for a, b in zip(cuts, cuts[1:],
                                                                           strict=False)]}


def ablation_leg(args) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    for variant, options in VARIANTS.items():
        if variant not in args.variants:
            continue
        for seed in args.seeds:
            t0 = time.time()
            options = {**options, "representation": args.representation}
            if (args.engine or "lean") == "lean":
                row = lean_run(options, seed, args.ablation_budget)
            else:
                extra = [f"--set=strategy.options.{k}={str(v).lower()}"
                         for k, v in options.items()]
                url = cli_run(ROOT / "experiments/digits/m2n2_pretrained.yaml",
                              args.work / f"pre-{variant}-s{seed}", seed,
                              args.ablation_budget, extra)
                row = summarise(url, [1000, 2500, 5000, 10000])
            rows.setdefault(variant, []).append({"seed": seed, "wall_s": time.time() - t0,
                                                 **row})
            log.info("%s seed %d: %s", variant, seed, rows[variant][-1])
    return rows


# -- the dense reference --------------------------------------------------------------------

def dense_run(seed: int, budget: int, *, split_unit: str = "flattened", mutation: float = 0.01,
              archive: int = 20, noise_cap: int | None = None, log_every: int = 5000,
              ) -> dict[str, Any]:
    """M2N2 from scratch as plainly as it can be written: the archive holds ``archive`` flat
    weight vectors (the ``scratch:<k>`` MLPs), the paper's competition, attraction,
    split-point crossover with one global SLERP angle and N(0, ``mutation``^2) per
    parameter; ``budget`` forward passes over the training images, the initial members
    included.  ``split_unit``: ``flattened`` (the paper: any index), or ``tensors``, ``rows``,
    ``block:<N>`` (the index snapped to the nearest boundary of those units, as the
    strategy with that ``granularity`` does).  ``noise_cap``: emulate a bounded recipe: each member
    keeps only its ``noise_cap`` most recent mutations (older ones are subtracted again),
    ``None`` keeps everything.  The reference the strategy is compared against."""
    scorer = LeanDigits([f"scratch:{k}" for k in range(archive)])
    rng = np.random.default_rng(seed)
    members = [scorer.flat[f"scratch:{k}"].copy() for k in range(archive)]
    n = members[0].size
    cuts = np.cumsum([0] + [int(np.prod(s)) for s in scorer.shapes])

    def forward(flat: np.ndarray, split: str) -> np.ndarray:
        parts = [flat[a:b].reshape(s).astype(np.float32) for a, b, s in
                 zip(cuts[:-1], cuts[1:], scorer.shapes, strict=True)]
        x, y = scorer.data[split]
        logits = np.maximum(x @ parts[0].T + parts[1], 0) @ parts[2].T + parts[3]
        return logits.argmax(1) == y

    if split_unit != "flattened":  # tensors, rows or block:<N>: the strategy's units
        layout = [[nm, list(sh), int(nm.split(".")[1])] for nm, sh in
                  zip(scorer.names, scorer.shapes, strict=True)]
        gran, _, block = split_unit.partition(":")
        inner = m2n2.units(layout, "flattened" if gran == "block" else gran,
                           int(block or 1))[1:-1]
    scores = [forward(m, "train") for m in members]
    noises: list[list[tuple[float, np.ndarray]]] = [[] for _ in members]
    values = [float(s.mean()) for s in scores]
    best, best_flat = max(values), members[int(np.argmax(values))].copy()
    t0 = time.time()
    for step in range(archive, budget):
        s = np.stack(scores).astype(float)
        z = s.sum(0)
        shared = s / np.where(z > 0, z, 1.0)
        f = shared.sum(1)
        a = int(rng.choice(len(f), p=f / f.sum()) if f.sum() > 0 else rng.integers(len(f)))
        g = np.maximum(0.0, shared - shared[a]).sum(1)
        g[a] = 0.0
        if g.sum() <= 0:
            g = f.copy()
            g[a] = 0.0
        if g.sum() <= 0:
            g = np.ones(len(f))
            g[a] = 0.0
        b = int(rng.choice(len(g), p=g / g.sum()))
        w = rng.uniform()
        k = int(rng.integers(1, n))
        if split_unit != "flattened":
            k = int(inner[np.argmin(np.abs(inner - k))])
        t = np.where(np.arange(n) < k, w, 1.0 - w)
        xa, xb = members[a], members[b]
        cos = float(xa @ xb / max(np.linalg.norm(xa) * np.linalg.norm(xb), 1e-30))
        omega = math.acos(min(1.0, max(-1.0, cos)))
        if math.sin(omega) <= 1e-6:
            fa, fb = 1.0 - t, t
        else:
            fa, fb = np.sin((1 - t) * omega) / math.sin(omega), np.sin(t * omega) / math.sin(omega)
        child = fa * xa + fb * xb
        kept: list[tuple[float, np.ndarray]] = []
        if noise_cap is not None:  # each inherited mutation, at its coefficient in the child
            for idx, fac in ((a, fa), (b, fb)):
                for c, eps in noises[idx]:
                    kept.append((c, fac * eps))
        eps = rng.normal(0.0, mutation, n) if mutation > 0 else np.zeros(n)
        child = child + eps
        if noise_cap is not None:
            kept.append((0.0, eps))
            for _, dropped in kept[:-noise_cap]:
                child = child - dropped
            kept = kept[-noise_cap:]
        sc = forward(child, "train")
        values.append(float(sc.mean()))
        if values[-1] > best:
            best, best_flat = values[-1], child.copy()
        pool_s = np.stack([*scores, sc]).astype(float)
        z = pool_s.sum(0)
        fit = (pool_s / np.where(z > 0, z, 1.0)).sum(1)
        drop = min(range(len(fit)), key=lambda i: (fit[i], -i))
        if drop < len(members):
            members[drop], scores[drop], noises[drop] = child, sc, kept
        if log_every and (step + 1) % log_every == 0:
            log.info("dense seed %d: %d passes, best train %.3f (%.0f s)", seed, step + 1,
                     best, time.time() - t0)
    return {"seed": seed, "best_train": best, "test": float(forward(best_flat, "test").mean()),
            "curve": {bb: float(max(values[:bb])) for bb in (1000, 5000, 10000, 25000, 50000)
                      if len(values) >= bb}, "wall_s": time.time() - t0}



def dense_cmaes(seed: int, budget: int, *, sigma0: float = 0.01, popsize: int = 20,
                log_every: int = 5000) -> dict[str, Any]:
    """The CMA-ES baseline at equal forward passes, over the 19,210 flattened weights from
    ``scratch:0``: pycma with ``CMA_diagonal`` (sep-CMA-ES: a diagonal covariance; the
    paper's full covariance needs ~3 GB and hours here), sigma0 and popsize as in the
    paper (0.01, 20); fitness: training accuracy."""
    import cma

    scorer = LeanDigits(["scratch:0"])
    x0 = scorer.flat["scratch:0"].copy()
    es = cma.CMAEvolutionStrategy(x0, sigma0, {"popsize": popsize, "CMA_diagonal": True,
                                               "seed": seed + 1, "verbose": -9,
                                               "maxfevals": budget})
    values, best, best_flat, t0 = [], -1.0, x0, time.time()
    while len(values) < budget:
        xs = es.ask()
        accs = []
        for x in xs[:budget - len(values)]:
            acc = float(scorer.correct(None, "train", np.asarray(x)).mean())
            accs.append(acc)
            values.append(acc)
            if acc > best:
                best, best_flat = acc, np.asarray(x).copy()
        if len(accs) < len(xs):
            break
        es.tell(xs, [-a for a in accs])
        if log_every and len(values) % log_every < popsize:
            log.info("cmaes seed %d: %d passes, best train %.3f, sigma %.2g (%.0f s)", seed,
                     len(values), best, es.sigma, time.time() - t0)
    return {"seed": seed, "best_train": best,
            "test": float(scorer.correct(None, "test", best_flat).mean()),
            "curve": {b: float(max(values[:b])) for b in (1000, 5000, 10000, 25000, 50000)
                      if len(values) >= b}, "wall_s": time.time() - t0}

# -- diversity on the zoo and the hard zoo ----------------------------------------------------

def rebuilt(store, names: list[str] | None = None) -> m2n2.M2N2:
    """The M2N2 strategy of a study, rebuilt from its saved state alone: its models are
    those of its region probe's recipe (so a study the league table ran works too)."""
    from mergesearch.recipe import Recipe
    from mergesearch.strategies import Dimension, Objective, Problem

    (probe,) = store.probes()
    recipe = Recipe.from_dict(probe.recipe)
    names = names or sorted(next(t for t in store.trials() if t.state == "ok").values)
    problem = Problem((Dimension("x", 0.0, 1.0, 0.5),),
                      tuple(Objective(n, "maximize") for n in names),
                      decode=lambda x: recipe)
    state = store.load_state()
    strategy = m2n2.M2N2(problem, state["options"], seed=state["seed"])
    strategy.load_state_dict(state)
    return strategy


def diversity_leg(args) -> dict[str, Any]:
    from mergesearch.storage import TrialStore

    out = {}
    for testbed in ("zoo", "hard"):
        if args.league:  # a study the league table ran (seed 0)
            store = TrialStore.open(f"sqlite:///{args.league / f'{testbed}.db'}",
                                    f"{testbed}-m2n2-e100-s0")
        else:
            path = ROOT / f"experiments/{testbed}/m2n2.yaml"
            store = study(cli_run(path, args.work / f"diversity-{testbed}", 0,
                                  args.diversity_budget))
        strategy = rebuilt(store)
        trials = {t.candidate_id: t for t in store.trials() if t.state == "ok"}
        skills = sorted(next(iter(trials.values())).scores)
        metric = "char_accuracy"
        table = []
        marks = sorted({min(len(strategy.history), k) for k in (1, 10, 25, 50, 75, 100,
                                                                  len(strategy.history))})
        for k in marks:
            ids = strategy.history[k - 1]
            best = {s: max(trials[i].scores[s][metric] for i in ids) for s in skills}
            top = max(trials[i].values["mean"] for i in ids)
            table.append({"told": k, "best_per_skill": best, "best_member_mean": top,
                          "members": len(ids)})
        out[testbed] = {"skills": skills, "table": table}
    return out


# -- markdown -------------------------------------------------------------------------------

def ms(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * np.mean(values):.1f} ± {100 * np.std(values, ddof=1):.1f}"


def _num(value: float | None, scale: float = 1.0) -> str:
    return "-" if value is None else f"{scale * value:.1f}"


def markdown(figures: dict[str, Any], args) -> str:
    lines = []
    for leg in ("scratch", "cmaes"):
        if leg not in figures:
            continue
        rows = figures[leg]
        budgets = sorted({b for r in rows for b in r["curve"]})
        title = ("M2N2 from scratch (20 untrained MLPs, experiments/digits/m2n2_scratch.yaml)"
                 if leg == "scratch" else "separable CMA-ES (CMA_diagonal), popsize 20, "
                 "40 layer-wise linear weights of the same 20 MLPs")
        engines = {r.get("engine", "cli") for r in rows}
        how = ("through `mergesearch run`" if engines == {"cli"} else "in the lean engine"
               if engines == {"lean"} else "engines: " + ", ".join(
                   f"seed {r['seed']} {r.get('engine', 'cli')}" for r in rows))
        lines += [f"**{title}**, {how}, seeds "
                  f"{', '.join(str(r['seed']) for r in rows)}:", "",
                  "| seed | passes | " + " | ".join(f"best train @{b}" for b in budgets)
                  + " | test (best train trial) | paper (test) | cand/s | merge ms | eval ms |"
                  " entries |", "|" + "---|" * (len(budgets) + 8)]
        for r in rows:
            lines.append(f"| {r['seed']} | {r['n']} | " + " | ".join(
                f"{100 * r['curve'][b]:.1f}" if b in r["curve"] else "-" for b in budgets)
                + f" | {100 * r['test']:.1f} | {100 * PAPER[leg]:.0f} | {_num(r.get('per_s'))} | "
                f"{_num(r.get('merge_s'), 1000)} | {_num(r.get('evaluate_s'), 1000)} | "
                f"{r.get('entries') or '-'} |")
        lines.append("")
    if "ablation" in figures:
        rows = figures["ablation"]
        lines += [f"**From the two pretrained halves**, {args.ablation_budget} passes, "
                  f"engine {args.engine or 'lean'}, seeds {', '.join(map(str, args.seeds))} "
                  "(mean ± std, n - 1):", "",
                  "| variant | best train | test (best train trial) | paper (test) | "
                  "per seed (test) |", "|---|---|---|---|---|"]
        for variant, runs in rows.items():
            lines.append(f"| {variant} | {ms([r['best_train'] for r in runs])} | "
                         f"{ms([r['test'] for r in runs])} | {100 * PAPER[variant]:.1f} | "
                         + ", ".join(f"{100 * r['test']:.1f}" for r in runs) + " |")
        lines.append("")
    if "diversity" in figures:
        for testbed, data in figures["diversity"].items():
            skills = data["skills"]
            lines += [f"**Archive diversity, {testbed}** (best score per skill among the "
                      "archive's members after k told candidates; seed 0):", "",
                      "| told | members | " + " | ".join(skills) + " | best member (mean) |",
                      "|" + "---|" * (len(skills) + 3)]
            for row in data["table"]:
                lines.append(f"| {row['told']} | {row['members']} | " + " | ".join(
                    f"{row['best_per_skill'][s]:.3f}" for s in skills)
                    + f" | {row['best_member_mean']:.3f} |")
            lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--legs", default="scratch,cmaes,ablation,diversity")
    ap.add_argument("--seeds", default="0,1", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--budget", type=int, default=50_000)
    ap.add_argument("--cmaes-budget", type=int, default=None)
    ap.add_argument("--budgets", default="1000,5000,10000,25000,50000",
                    type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--ablation-budget", type=int, default=10_000)
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    type=lambda s: s.split(","), help="ablation variants to run")
    ap.add_argument("--diversity-budget", type=int, default=100)
    ap.add_argument("--engine", choices=("lean", "cli"), default=None,
                    help="how the scratch and ablation legs run (default: scratch through "
                         "the CLI, the ablation in the lean engine)")
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="lean scratch runs: stop each seed after this much wall time and "
                         "report the passes reached")
    ap.add_argument("--representation", choices=("terms", "lineage"), default="terms",
                    help="the ablation's children (both exact without mutation; lineage "
                         "recipes stay a few entries long, so the lean engine is faster)")
    ap.add_argument("--league", type=Path, default=None,
                    help="diversity from the league table's studies in this folder "
                         "(<testbed>.db, study <testbed>-m2n2-e100-s0) instead of new runs")
    ap.add_argument("--work", type=Path, default=Path("/tmp/m2n2-bench"))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--figures", type=Path, nargs="*", default=[],
                    help="JSON files of earlier invocations: their figures are merged in "
                         "(ablation variants side by side) and nothing new is run")
    args = ap.parse_args(argv)
    args.cmaes_budget = args.cmaes_budget or args.budget
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    figures: dict[str, Any] = {}
    if args.figures:
        for path in args.figures:
            for leg, value in json.loads(path.read_text()).items():
                if leg == "ablation":
                    figures.setdefault(leg, {}).update(value)
                else:
                    figures[leg] = value
        for leg in ("scratch", "cmaes"):
            for row in figures.get(leg, []):
                row["curve"] = {int(b): v for b, v in row["curve"].items()}
        print(markdown(figures, args))
        return 0
    legs = args.legs.split(",")
    for leg, fn in (("scratch", scratch_leg), ("cmaes", cmaes_leg),
                    ("ablation", ablation_leg), ("diversity", diversity_leg)):
        if leg in legs:
            figures[leg] = fn(args)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, default=str) + "\n")
    print(markdown(figures, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
