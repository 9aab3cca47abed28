"""In-memory Hugging Face evaluator: score a resident ``transformers`` model many times.

Everything that does not depend on the weights (reading the suite, rendering and
tokenising every item, padding, stop-string tables) happens once, in the constructor;
:meth:`HFEvaluator.evaluate` only runs the model: length-sorted batches under
``no_grad``, one teacher-forced pass per row, and greedy generation only for tasks
whose objectives need ``exact_match``. Generation is pooled across tasks: the tasks of an
evaluation with the same generation settings (stop strings, ``max_gen_toks``, the rest of
``generation_kwargs``) share one set of length-sorted batches, because a ``generate``
call costs its decoding steps almost whatever its batch size on a small model.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase, StoppingCriteriaList, StopStringCriteria

from .base import Evaluation, EvaluationError
from .config import EvaluatorConfig
from .estimators import NEEDS_CALIBRATION, Estimator, make_estimator
from .scorers import RowStats, custom_scores, greedy_generate, load_scorer, pad_right, score_rows
from .tasks import Rendered, TaskSpec, find_suite, load_suite

log = logging.getLogger(__name__)
_NAN = float("nan")


@dataclass
class _Task:
    """One task's items, tokenised: one teacher-forced row per item (per choice for MC)."""

    spec: TaskSpec
    n: int
    ids: torch.Tensor  # [rows, width], right-padded context + continuation
    lengths: torch.Tensor  # [rows]
    starts: torch.Tensor  # [rows]: context length - 1
    row_ptr: list[int]  # item i owns rows row_ptr[i]:row_ptr[i + 1]
    doc_ids: list[int] = field(default_factory=list)  # item i is document doc_ids[i] of the file
    docs: list[dict] = field(default_factory=list)  # item i's document (custom scorers read it)
    targets: list[str] = field(default_factory=list)  # generate_until
    prompts: list[list[int]] = field(default_factory=list)  # generate_until, for generation
    gold: list[int] = field(default_factory=list)  # multiple_choice
    choice_chars: list[list[int]] = field(default_factory=list)  # multiple_choice, acc_norm
    stopping: StoppingCriteriaList | None = None
    on_device: dict[torch.device, tuple[torch.Tensor, ...]] = field(default_factory=dict)
    # (fidelity, seed, device) -> its batches, the same for every candidate
    batches: dict[tuple, _Batches] = field(default_factory=dict)


@dataclass
class _Batches:
    """Which items a (fidelity, seed) scores and how its rows are batched on a device."""

    idx: list[int]  # items, in order
    chunks: list[tuple[torch.Tensor, int]]  # row indices on the device, padded width
    inverse: torch.Tensor  # on the device: batched order -> row order


class HFEvaluator:
    """Scores a ``transformers`` causal LM on a suite of lm-eval task YAMLs.

    ``metrics`` names extra metrics to compute on every task that can (in practice
    ``exact_match``: generation runs only for tasks that an objective or this asks it for).
    """

    #: Generate for all tasks of an evaluation that share their generation settings in one
    #: set of batches (the default); False: one set per task. Greedy texts are the same
    #: either way (tests/evaluation/test_generation_pools.py); pooling only saves calls.
    pool_generation: bool = True

    def __init__(self, config: EvaluatorConfig, tokenizer: PreTrainedTokenizerBase, *,
                 base_dir: str | Path | None = None, metrics: Collection[str] = ()) -> None:
        self.config = config
        self.tokenizer = tokenizer
        specs = load_suite(find_suite(config.suite, base_dir))
        names = list(dict.fromkeys(config.tasks or sorted(specs)))
        unknown = [n for n in names if n not in specs]
        if unknown:
            raise EvaluationError(f"evaluator.tasks names unknown tasks {unknown}; the suite "
                                  f"{config.suite!r} has {sorted(specs)}")
        self.tasks = {n: specs[n] for n in names}
        # recipe and weight objectives are computed on the worker (mergesearch.objectives)
        self._objectives = [o for o in config.objectives if o.source == "evaluator"]
        self.objective_names = [o.name for o in self._objectives]
        self.directions = {o.name: o.direction for o in self._objectives}
        self._objective_tasks = {o.name: self._check_objective(o.name, o.metric, o.tasks)
                                 for o in self._objectives}
        known = {m for spec in self.tasks.values() for m in spec.metrics}
        if bad := sorted(set(metrics) - known):
            raise EvaluationError(f"metrics {bad} are not produced by any task; choose from "
                                  f"{sorted(known)}")
        wanted = {(t, o.metric) for o in self._objectives for t in self._objective_tasks[o.name]}
        wanted |= {(t, m) for t, s in self.tasks.items() for m in metrics if m in s.metrics}
        self._generate = {t for t, m in wanted if _generated(self.tasks[t], m)}
        # (task, metric) -> the custom scorer of a task that generates, imported once
        self._scorers = {(t, m): load_scorer(path, t, m) for t in sorted(self._generate)
                         for m, path in self.tasks[t].scorers.items()}
        if self.tokenizer.eos_token_id is None and any(
                s.output_type == "generate_until" for s in self.tasks.values()):
            raise EvaluationError("generate_until tasks need a tokenizer with an eos token "
                                  "(the end of every answer); set tokenizer.eos_token")
        self._pad = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0)
                         if i is not None)
        self._data = {name: self._prepare(spec) for name, spec in self.tasks.items()}
        log.debug("evaluator ready: %s", {n: d.n for n, d in self._data.items()})
        # estimator (task, metric) -> Estimator; built by calibrate() (from the sources)
        self.estimator = config.estimator if config.estimator is not None and \
            config.estimator.kind != "full" else None
        self._estimators: dict[tuple[str, str], Estimator] = {}
        if self.estimator is not None:
            self._check_estimator_items()
            if self.estimator.kind not in NEEDS_CALIBRATION:
                self.calibrate({})
            elif self.estimator.sources:
                self.calibrate(self.source_answers(self.estimator.sources))

    # -- estimators (mergesearch.evaluation.estimators) ------------------------------------

    def _check_estimator_items(self) -> None:
        k = self.estimator.items
        small = {t: d.n for t, d in self._data.items() if d.n < self.estimator.count(d.n)}
        if small:
            raise EvaluationError(f"evaluator.estimator.items {k} is more than the items of "
                                  f"task(s) {small}; choose at most {min(small.values())}")

    @property
    def estimated(self) -> list[tuple[str, str]]:
        """The (task, metric) pairs an estimator predicts: the objectives' metrics."""
        return sorted({(t, o.metric) for o in self._objectives
                       for t in self._objective_tasks[o.name]})

    def item_answers(self, model: nn.Module) -> dict[tuple[str, str], list[float]]:
        """``model``'s per-item scores on every item, for the estimated (task, metric)s."""
        ev = self._evaluate(model, fidelity=1.0, seed=0, estimate=False)
        return {(t, m): ev.item_scores[t][m] for t, m in self.estimated}

    def source_answers(self, refs: Sequence[str]) -> dict[tuple[str, str], np.ndarray]:
        """Full-set answers [models, items] of the calibration models ``refs`` (folders or
        zoo names), each loaded, scored once and dropped."""
        from transformers import AutoModelForCausalLM

        rows: dict[tuple[str, str], list[list[float]]] = {}
        for ref in refs:
            model = AutoModelForCausalLM.from_pretrained(_model_dir(ref))
            for key, values in self.item_answers(model).items():
                rows.setdefault(key, []).append(values)
            del model
        return {key: np.array(v, dtype=float) for key, v in rows.items()}

    def calibrate(self, answers: Mapping[tuple[str, str], np.ndarray]) -> None:
        """Build the estimators from calibration answers ``(task, metric) -> [models,
        items]`` (empty for ``subset``, which needs none)."""
        cfg = self.estimator
        if cfg is None:
            raise EvaluationError("calibrate: the evaluator has no estimator")
        built = {}
        for task, metric in self.estimated:
            n = self._data[task].n
            k = cfg.count(n)
            seed = f"{cfg.seed}:{task}"
            if cfg.kind not in NEEDS_CALIBRATION:
                built[task, metric] = make_estimator(cfg.kind, n, k, seed=seed)
                continue
            if (task, metric) not in answers:
                raise EvaluationError(f"estimator {cfg.kind}: no calibration answers for task "
                                      f"{task!r}, metric {metric!r}")
            options = {"select": cfg.select, "blend": cfg.predict == "gpirt",
                       "dims": cfg.dims} if cfg.kind == "irt" else {}
            built[task, metric] = make_estimator(cfg.kind, n, k, seed=seed,
                                                 answers=answers[task, metric], **options)
        self._estimators = built

    def _check_objective(self, name: str, metric: str, tasks: list[str] | None) -> list[str]:
        tasks = list(tasks or self.tasks)
        unknown = [t for t in tasks if t not in self.tasks]
        if unknown:
            raise EvaluationError(f"objective {name!r} names tasks {unknown} that the evaluator "
                                  f"does not load; choose from {list(self.tasks)} (or add them "
                                  "to evaluator.tasks)")
        for task in tasks:
            if metric not in self.tasks[task].metrics:
                spec = self.tasks[task]
                raise EvaluationError(
                    f"objective {name!r}: metric {metric!r} cannot be computed for task "
                    f"{task!r} ({spec.output_type}); choose one of {list(spec.metrics)}")
        return tasks

    @property
    def n_items(self) -> dict[str, int]:
        """Items per task after ``limit``."""
        return {n: d.n for n, d in self._data.items()}

    def _prepare(self, spec: TaskSpec) -> _Task:
        docs = spec.docs()
        keep = range(len(docs))
        if self.config.limit is not None and self.config.limit < len(docs):
            order = list(keep)
            random.Random(f"{self.config.subset_seed}:{spec.name}").shuffle(order)
            keep = sorted(order[: self.config.limit])
        items = [spec.render(docs[i], i) for i in keep]
        task = self._tokenise(spec, items)
        task.doc_ids = list(keep)
        if spec.scorers:
            task.docs = [docs[i] for i in keep]
        return task

    def _tokenise(self, spec: TaskSpec, items: list[Rendered]) -> _Task:
        tok = self.tokenizer
        if spec.output_type == "generate_until":
            prompts = [self._context_ids(p) for p in tok([it.context for it in items])["input_ids"]]
            conts = tok([spec.target_delimiter + it.target for it in items],
                        add_special_tokens=False)["input_ids"]
            rows = [(p, [*c, tok.eos_token_id]) for p, c in zip(prompts, conts, strict=True)]
            task = self._rows(spec, rows, list(range(len(items) + 1)))
            task.targets, task.prompts = [it.target for it in items], prompts
            stops = [s for s in spec.until if s and s != tok.eos_token]
            if stops and spec.name in self._generate:
                try:
                    task.stopping = StoppingCriteriaList([StopStringCriteria(tok, stops)])
                except ValueError as err:  # e.g. a tokenizer without a readable vocabulary
                    raise EvaluationError(f"task {spec.name!r}: its stop strings {stops} "
                                          f"cannot be matched with this tokenizer "
                                          f"({err})") from None
            return task
        pairs = [_split_space(it.context, spec.target_delimiter + c)
                 for it in items for c in it.choices]
        contexts = tok([c for c, _ in pairs])["input_ids"]
        conts = tok([c for _, c in pairs], add_special_tokens=False)["input_ids"]
        rows = [(self._context_ids(c), t) for c, t in zip(contexts, conts, strict=True)]
        ptr = [0]
        for it in items:
            ptr.append(ptr[-1] + len(it.choices))
        task = self._rows(spec, rows, ptr)
        task.gold = [it.gold for it in items]
        task.choice_chars = [[len(c) for c in it.choices] for it in items]
        return task

    def _context_ids(self, ids: list[int]) -> list[int]:
        """An empty context becomes ``[bos]`` (or ``[eos]``), as lm-eval does."""
        tok = self.tokenizer
        return ids or [next(i for i in (tok.bos_token_id, tok.eos_token_id, 0) if i is not None)]

    def _rows(self, spec: TaskSpec, rows: list[tuple[list[int], list[int]]],
              ptr: list[int]) -> _Task:
        if any(not cont for _, cont in rows):
            raise EvaluationError(f"task {spec.name!r}: an item has an empty target or choice; "
                                  "fix the data or doc_to_target / doc_to_choice")
        ids, lengths = pad_right([c + t for c, t in rows], self._pad)
        starts = torch.tensor([len(c) - 1 for c, _ in rows], dtype=torch.long)
        return _Task(spec, len(ptr) - 1, ids, lengths, starts, ptr)

    def evaluate(self, model: nn.Module, *, fidelity: float = 1.0, seed: int = 0) -> Evaluation:
        """Score ``model`` on every task; ``fidelity < 1`` uses a ``seed``-chosen subset.

        The subset of each task is the first ``ceil(fidelity * n)`` items of a seeded
        shuffle (so lower fidelities are nested in higher ones for the same seed). A
        model with non-finite logits gets NaN scores, not an exception.

        With an estimator (``evaluator.estimator``), a full-fidelity evaluation scores only
        the estimator's items and the objectives' metrics are its predictions of the
        full-set means; each estimated task's scores also keep ``<metric>,observed`` (the
        items' own mean), ``<metric>,<kind>`` (the prediction, naming the estimator) and
        ``estimator_items``; ``Evaluation.estimate`` says the same.
        """
        return self._evaluate(model, fidelity=fidelity, seed=seed,
                              estimate=self.estimator is not None and fidelity >= 1)

    def _evaluate(self, model: nn.Module, *, fidelity: float, seed: int,
                  estimate: bool) -> Evaluation:
        if not 0 < fidelity <= 1:
            raise EvaluationError(f"fidelity must be in (0, 1], got {fidelity}")
        if estimate and not self._estimators:
            raise EvaluationError(
                f"estimator {self.estimator.kind} has no calibration answers: list the "
                "source models in evaluator.estimator.sources, or call calibrate()")
        out = Evaluation(values={}, scores={}, correct={}, n_items={})
        with self._scoring(model) as device:
            generate: dict[str, list[int]] = {}  # task -> items to generate for
            for name, task in self._data.items():
                items = self._estimator_items(name) if estimate else None
                batches = self._batches(name, task, fidelity, seed, device, items)
                if self._score_task(model, name, task, batches, out):
                    generate[name] = batches.idx
            texts: dict[str, list[str]] = {}
            for pool in self._generation_pools(model, list(generate)):
                jobs = [(self._data[name], generate[name]) for name in pool]
                texts |= dict(zip(pool, self._generate_texts(model, jobs), strict=True))
            for name, idx in generate.items():  # in task order, as the scores are
                self._score_generated(name, self._data[name], idx, texts[name], out)
        if estimate:
            self._estimate(out)
        for obj in self._objectives:
            out.values[obj.name] = _mean([out.scores[t][obj.metric]
                                          for t in self._objective_tasks[obj.name]])
        return out

    @contextmanager
    def _scoring(self, model: nn.Module) -> Iterator[torch.device]:
        """While the tasks are scored: ``model`` in eval mode, no gradients; its device.
        (With :meth:`_teacher_forced`, :meth:`_generate_texts` and
        :meth:`_generation_pools`, what another backend that scores the same rows
        replaces.)"""
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                yield next(model.parameters()).device
        finally:
            model.train(was_training)

    def _estimator_items(self, task: str) -> list[int] | None:
        """The items the estimators of ``task`` score (None: the task is not estimated)."""
        items = {i for (t, _), e in self._estimators.items() if t == task for i in e.items}
        return sorted(items) if items else None

    def _estimate(self, out: Evaluation) -> None:
        """Replace the estimated metrics by their predictions, keeping the observed means."""
        kind = self.estimator.kind
        out.estimate = {"estimator": kind, "items": {}, "observed": {}, "predicted": {}}
        for (task, metric), est in self._estimators.items():
            pos = {i: j for j, i in enumerate(self._estimator_items(task))}
            values = out.item_scores[task][metric]
            seen = [values[pos[i]] for i in est.items]
            guess = est.predict(seen)
            observed = _mean(seen)
            if not math.isfinite(observed):  # non-finite logits: no prediction either
                guess = dict.fromkeys(guess, _NAN)
            out.scores[task] |= {metric: guess["estimate"], f"{metric},observed": observed,
                                 f"{metric},{kind}": guess["estimate"],
                                 "estimator_items": float(len(est.items))}
            out.scores[task] |= {f"{metric},{k}": v for k, v in guess.items()
                                 if k != "estimate"}
            out.estimate["items"][task] = len(est.items)
            out.estimate["observed"][f"{task}/{metric}"] = observed
            out.estimate["predicted"][f"{task}/{metric}"] = guess["estimate"]

    def _batches(self, name: str, task: _Task, fidelity: float, seed: int,
                 device: torch.device, items: list[int] | None = None) -> _Batches:
        """The items of a (fidelity, seed), or ``items``, and their length-sorted batches
        (built once)."""
        key = (fidelity, seed, device) if items is None else ("items", tuple(items), device)
        if key not in task.batches:
            idx = _subset(task.n, fidelity, f"{seed}:{name}") if items is None else items
            sel = torch.tensor([r for i in idx for r in range(task.row_ptr[i],
                                                               task.row_ptr[i + 1])],
                               dtype=torch.long)
            perm = torch.argsort(task.lengths[sel], stable=True)
            chunks = [(chunk.to(device), int(task.lengths[chunk].max()))
                      for chunk in sel[perm].split(self.config.batch_size)]
            task.batches[key] = _Batches(idx, chunks, torch.argsort(perm).to(device))
        return task.batches[key]

    def _score_task(self, model: nn.Module, name: str, task: _Task, batches: _Batches,
                    out: Evaluation) -> bool:
        """The teacher-forced metrics of ``batches``' items into ``out``; whether the task
        still needs generations (:meth:`_score_generated`): it generates and its logits
        were finite."""
        idx = batches.idx
        stats = self._teacher_forced(model, task, batches)
        n_target, n_hit = stats.n_target.tolist(), stats.n_hit.tolist()
        logprob = stats.logprob.tolist()
        finite = bool(stats.finite.all())
        out.n_items[name] = len(idx)
        out.indices[name] = [task.doc_ids[i] for i in idx]
        if task.spec.output_type == "generate_until":
            greedy = [h == n for h, n in zip(n_hit, n_target, strict=True)]
            per = {"char_accuracy": (stats.n_hit / stats.n_target).tolist(),
                   "answer_logprob": (stats.logprob / stats.n_target).tolist(),
                   "greedy_match": [float(g) for g in greedy]}
            scores = {m: _mean(v) for m, v in per.items()}
            correct = greedy
        else:
            acc, acc_norm, pos = [], [], 0
            for i in idx:
                k = task.row_ptr[i + 1] - task.row_ptr[i]
                lls = logprob[pos: pos + k]
                norm = [ll / c for ll, c in zip(lls, task.choice_chars[i], strict=True)]
                acc.append(_argmax(lls) == task.gold[i])
                acc_norm.append(_argmax(norm) == task.gold[i])
                pos += k
            scores, correct = {"acc": _mean(acc), "acc_norm": _mean(acc_norm)}, acc
            per = {"acc": [float(a) for a in acc], "acc_norm": [float(a) for a in acc_norm]}
        if not finite:  # NaN/inf logits: the scores mean nothing, and generation is skipped
            scores = {m: _NAN for m in task.spec.metrics
                      if not _generated(task.spec, m) or name in self._generate}
            correct = [False] * len(idx)
            per = {m: [_NAN] * len(idx) for m in scores}
        out.scores[name], out.correct[name], out.item_scores[name] = scores, correct, per
        return finite and name in self._generate

    def _score_generated(self, name: str, task: _Task, idx: list[int], texts: list[str],
                         out: Evaluation) -> None:
        """Exact match (per filter pipeline) and custom scorers of the generations
        ``texts`` of items ``idx``, added to the task's teacher-forced scores."""
        scores, per = out.scores[name], out.item_scores[name]
        targets = [task.targets[i] for i in idx]
        out.outputs[name] = texts
        matches = _exact(task.spec, texts, targets)
        correct = next(iter(matches.values()))  # the first filter pipeline's
        scores["exact_match"] = _mean(correct)
        per["exact_match"] = [float(c) for c in correct]
        scores |= {f"exact_match,{p}": _mean(ok) for p, ok in matches.items() if p}
        for metric, path in task.spec.scorers.items():
            per[metric] = custom_scores(self._scorers[name, metric], path, metric, name, texts,
                                        targets, [task.docs[i] for i in idx],
                                        out.indices[name])
            scores[metric] = _mean(per[metric])
        out.correct[name] = correct

    def _teacher_forced(self, model: nn.Module, task: _Task, batches: _Batches) -> RowStats:
        """Row statistics of the batches' items, in item order."""
        device = batches.inverse.device
        if device not in task.on_device:
            task.on_device = {device: tuple(t.to(device) for t in
                                            (task.ids, task.lengths, task.starts))}
        ids, lengths, starts = task.on_device[device]
        stats = RowStats.cat([score_rows(model, ids[c, :width], lengths[c], starts[c])
                              for c, width in batches.chunks])
        inv = batches.inverse
        return RowStats(*(t[inv].cpu() for t in (stats.n_target, stats.n_hit, stats.logprob,
                                                 stats.finite)))

    def _generation_pools(self, model: nn.Module, names: list[str]) -> list[list[str]]:
        """``names`` (tasks to generate for) grouped into pools, each generated by one
        :meth:`_generate_texts` call: tasks with the same generation settings
        (:func:`_generation_key`), in task order; one pool per task when
        :attr:`pool_generation` is off."""
        if not self.pool_generation:
            return [[name] for name in names]
        pools: dict[tuple, list[str]] = {}
        for name in names:
            pools.setdefault(_generation_key(self.tasks[name]), []).append(name)
        return list(pools.values())

    def _generate_texts(self, model: nn.Module, jobs: Sequence[tuple[_Task, list[int]]]
                        ) -> list[list[str]]:
        """Greedy generations for each ``(task, items)`` of one pool (the same generation
        settings), cut at the stop strings: one set of ``batch_size`` batches of all the
        pool's prompts, sorted by length, so the fixed cost of a ``generate`` call (its
        decoding steps) is paid once per batch, not once per task."""
        tok, task = self.tokenizer, jobs[0][0]
        rows = [(t, i) for t, idx in jobs for i in idx]
        order = sorted(range(len(rows)), key=lambda r: len(rows[r][0].prompts[rows[r][1]]))
        texts: list[str] = [""] * len(rows)
        for start in range(0, len(order), self.config.batch_size):
            chunk = order[start: start + self.config.batch_size]
            new = greedy_generate(model, [rows[r][0].prompts[rows[r][1]] for r in chunk],
                                  max_new_tokens=task.spec.max_gen_toks,
                                  eos_token_id=tok.eos_token_id, pad_token_id=self._pad,
                                  stopping=task.stopping)
            for r, ids in zip(chunk, new, strict=True):
                texts[r] = _cut(tok.decode(ids, skip_special_tokens=True), task.spec.until)
        out, pos = [], 0
        for _, idx in jobs:
            out.append(texts[pos: pos + len(idx)])
            pos += len(idx)
        return out


def _exact(spec: TaskSpec, texts: Sequence[str], targets: Sequence[str]
           ) -> dict[str, list[bool]]:
    """Per filter pipeline, whether each filtered text matches its target."""
    filtered = [spec.filtered(t) for t in texts]
    return {pipe: [spec.matches(f[pipe], t) for f, t in zip(filtered, targets, strict=True)]
            for pipe in filtered[0]}


def _generation_key(spec: TaskSpec) -> tuple:
    """What generation depends on besides the prompt: the stop strings, ``max_gen_toks``
    and the rest of the task's ``generation_kwargs``. Tasks with equal keys can share
    batches."""
    rest = {k: v for k, v in spec.generation_kwargs.items() if k not in ("until", "max_gen_toks")}
    return spec.until, spec.max_gen_toks, json.dumps(rest, sort_keys=True, default=repr)


def _cut(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first of each stop string in turn."""
    for stop in until:
        text = text.split(stop)[0] if stop else text
    return text


def _generated(spec: TaskSpec, metric: str) -> bool:
    """Whether ``metric`` of ``spec`` is read from generations (exact match, custom scorers)."""
    return metric.startswith("exact_match") or metric in spec.scorers


def _subset(n: int, fidelity: float, key: str) -> list[int]:
    """All items in order, or the first ``ceil(fidelity * n)`` of a seeded shuffle, sorted."""
    if fidelity >= 1:
        return list(range(n))
    order = list(range(n))
    random.Random(key).shuffle(order)
    return sorted(order[: max(1, math.ceil(fidelity * n - 1e-9))])


def _model_dir(ref: str) -> str:
    """A calibration model's folder: a zoo name (built on first use) or a path."""
    if ref.startswith("zoo:"):
        name = ref.removeprefix("zoo:")
        if name.startswith("hard/"):
            from mergesearch.zoo.hard import build_hard_zoo

            zoo, name = build_hard_zoo(), name.removeprefix("hard/")
        else:
            from mergesearch.zoo import build_zoo

            zoo = build_zoo()
        try:
            return str(zoo.model_path(name))
        except KeyError as err:
            raise EvaluationError(f"evaluator.estimator.sources: {err.args[0]}") from None
    from mergesearch.models.checkpoint import ModelLoadError, resolve_model_dir

    try:
        return str(resolve_model_dir(ref))
    except ModelLoadError as err:
        raise EvaluationError(f"evaluator.estimator.sources: {err}") from None


def _split_space(context: str, continuation: str) -> tuple[str, str]:
    """Move the context's trailing whitespace onto the continuation (lm-eval's rule)."""
    stripped = context.rstrip()
    return stripped, context[len(stripped):] + continuation


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def _mean(values: Sequence[float] | Sequence[bool]) -> float:
    return sum(values) / len(values) if values else _NAN
