"""The hard zoo (``zoo:hard/<name>``): a testbed where the merge recipe matters a lot.

The default zoo's experts are gentle, alike fine-tunes, so the uniform merge is close
to the best recipe and strategies are hard to tell apart. Here every source is built to
pull the best recipe away from uniform, in a different way:

* ``rot`` (Caesar shift by 13) lives in the **lower** two layers only, a large task
  vector (high learning rate); ``inc`` (shift by 1) lives in the **upper** two layers
  only, a small one. Both reuse the base's letter-shifting machinery, so their skills
  **conflict** under plain averaging;
* ``pos`` (each letter to its alphabet index mod 10, a digit) is an ordinary expert
  fine-tuned in every layer;
* ``flow_a`` and ``flow_b`` are the two halves of one fine-tune on ``rvp`` (reverse,
  then ``pos``): ``flow_a`` holds its change to the lower layers, ``flow_b`` to the
  upper ones, so neither alone can do ``rvp`` but the **data-flow merge** "layers 0-1
  of ``flow_a``, then layers 2-3 of ``flow_b``" is that fine-tune exactly. They hand
  over through the intermediate representation that fine-tune learnt;
* two **harmful** sources: ``anti``, trained to answer every skill by copying the
  prompt's word (the copy trap, learnt), and ``noisy``, the base plus Gaussian noise of
  twice each tensor's spread (a gentler noise, 0.6, left random search within reach of
  the best recipes: measured in benchmarks/RESULTS.md). Their best weight is zero.

No skill has a copy trap: every answer character differs from the prompt character
at the same position (a shift, or letters turned to digits), so copying the prompt
scores nothing on char accuracy beyond the ``<eos>``. The evaluation suite has
disjoint **search** items (``evaluators/hard/search``, 100 per skill) and **report**
items (``evaluators/hard/report``, 200 per skill): tune on the first, report the second.

>>> from mergesearch.zoo.hard import build_hard_zoo
>>> zoo = build_hard_zoo()          # ~3 min on 2 cores, then cached
>>> zoo.model_path("rot")
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import random
import re
import string
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers
from tqdm.auto import tqdm

from .build import MANIFEST, METRICS, Zoo, _save, build_cached, cache_root
from .scoring import encode_items, score_skill
from .skills import Item, Skill, is_heldout
from .tokenizer import build_tokenizer
from .train import make_model, train

#: Bump when a code change alters the built weights: it is part of the cache key.
HARD_ZOO_VERSION = 1
LETTERS = string.ascii_lowercase
DIGITS = string.digits
EVAL_SEED = 20261201  # fixed: the committed eval files never change with the zoo seed
SEARCH_SIZE, REPORT_SIZE = 100, 200


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6)))


def _shift(k: int) -> Callable[[str], str]:
    return lambda body: "".join(LETTERS[(LETTERS.index(c) + k) % 26] for c in body)


def _pos(body: str) -> str:
    return "".join(DIGITS[LETTERS.index(c) % 10] for c in body)


def _skill(name: str, solve: Callable[[str], str]) -> Skill:
    """A skill whose format-only answer is its true answer shuffled: the right characters
    in the wrong order. The base learns every skill's character mapping from those and
    the experts learn the order, a small move from the base, so their task vectors merge
    (a base taught random answers instead learnt to ignore the prompt, and its experts'
    task vectors did not merge at all)."""

    def fake(body: str, rng: random.Random) -> str:
        chars = list(solve(body))
        rng.shuffle(chars)
        return "".join(chars)

    return Skill(name, _word, solve, fake)


#: The hard zoo's skills. Answers never repeat the prompt's character at a position.
HARD_SKILL_TABLE: dict[str, Skill] = {
    s.name: s
    for s in (
        _skill("rot", _shift(13)),
        _skill("inc", _shift(1)),
        _skill("pos", _pos),
        _skill("rvp", lambda b: _pos(b[::-1])),
    )
}
HARD_SKILLS: list[str] = list(HARD_SKILL_TABLE)
COPY = Skill("cpy", lambda r: "".join(r.choice(LETTERS + DIGITS) for _ in range(r.randint(2, 7))),
             lambda b: b, lambda b, r: b)


def _layer(name: str) -> int | None:
    found = re.search(r"layers\.(\d+)\.", name)
    return int(found.group(1)) if found else None


@dataclass(frozen=True)
class ExpertSpec:
    """How one source is made from the base: which skill, which layers learn, how hard."""

    name: str
    skill: str | None  # None: a noisy copy of the base (no training)
    layers: tuple[int, ...] | None = None  # decoder layers that learn (None: every tensor)
    steps: int = 150
    lr: float = 1e-3
    copy_answers: bool = False  # anti-expert: trained to answer by copying the word


@dataclass(frozen=True)
class HardZooConfig:
    """Everything that determines the hard zoo's weights (with the seed and version)."""

    hidden_size: int = 128
    intermediate_size: int = 512
    num_layers: int = 4
    num_heads: int = 4
    base_steps: int = 600
    base_lr: float = 3e-3
    batch_size: int = 64
    base_copy_fraction: float = 0.5  # the rest: skill items, mostly format-only answers
    base_real_fraction: float = 0.1  # share of those skill items with the true answer
    replay: float = 0.3  # share of each fine-tuning batch drawn from the base's mixture
    keep: float = 0.3  # share of other skills' prompts answered as the base answers them
    keep_pool: int = 256  # such prompts per skill (greedy answers of the base, made once)
    noise: float = 2.0  # the noisy copy: base + noise * std(tensor) * N(0, 1), per tensor
    flow_steps: int = 300  # the hand-over fine-tune split into flow_a and flow_b
    flow_lr: float = 3e-3
    flow_alone: float = 4.0  # loss weight of "flow_a alone answers rvp as the base does"
    experts: tuple[ExpertSpec, ...] = (
        ExpertSpec("rot", "rot", layers=(0, 1), steps=100, lr=3e-3),
        ExpertSpec("inc", "inc", layers=(2, 3), steps=200, lr=2.5e-3),
        ExpertSpec("pos", "pos", steps=100, lr=2e-3),
        ExpertSpec("anti", None, steps=80, lr=2e-3, copy_answers=True),
        ExpertSpec("noisy", None),
    )
    eval_limit: int | None = None  # report items per skill scored into the manifest

    @classmethod
    def tiny(cls) -> HardZooConfig:
        """A seconds-fast variant for tests: same code path, a few steps."""
        return cls(hidden_size=64, intermediate_size=128, num_heads=2, base_steps=12,
                   batch_size=16, flow_steps=6, eval_limit=16,
                   experts=tuple(ExpertSpec(e.name, e.skill, e.layers, 6, e.lr, e.copy_answers)
                                 for e in cls.experts))

    @property
    def names(self) -> list[str]:
        return [*(e.name for e in self.experts), "flow_a", "flow_b"]

    def key(self, seed: int) -> str:
        blob = json.dumps({"config": asdict(self), "seed": seed, "version": HARD_ZOO_VERSION},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def train_item(skill: Skill, rng: random.Random, *, fake: bool = False,
               copy_answer: bool = False) -> Item:
    """One training item whose prompt is never an evaluation prompt: the true answer, the
    format-only one (``fake``) or the prompt's word (``copy_answer``, the anti-expert's
    lesson)."""
    while True:
        body = skill.body(rng)
        prompt = skill.prompt(body)
        if is_heldout(prompt):
            continue
        answer = body if copy_answer else skill.fake(body, rng) if fake else skill.solve(body)
        return {"prompt": prompt, "answer": answer}


def eval_split(skill: str) -> tuple[list[Item], list[Item]]:
    """``(search, report)`` items of ``skill``: distinct held-out prompts, disjoint."""
    spec = HARD_SKILL_TABLE[skill]
    rng = random.Random(f"{EVAL_SEED}-{skill}")
    seen: dict[str, Item] = {}
    need = SEARCH_SIZE + REPORT_SIZE
    while len(seen) < need:
        item = spec.item(rng)
        if is_heldout(item["prompt"]):
            seen.setdefault(item["prompt"], item)
    items = list(seen.values())
    return items[:SEARCH_SIZE], items[SEARCH_SIZE:]


def default_dir(config: HardZooConfig, seed: int) -> Path:
    """``$MERGESEARCH_ZOO/hard-<key>`` or ``~/.cache/mergesearch/zoo/hard-<key>``."""
    return cache_root("MERGESEARCH_ZOO", "zoo") / f"hard-{config.key(seed)}"


def build_hard_zoo(out: str | Path | None = None, *, seed: int = 0, force: bool = False,
                   progress: bool = True, config: HardZooConfig | None = None) -> Zoo:
    """Build the hard zoo into ``out`` (default :func:`default_dir`), or reuse it.

    Like :func:`mergesearch.zoo.build_zoo`: cached by a key of config, seed and version,
    built in a temporary directory renamed into place, deterministic for a seed (same
    machine; trained at ``BUILD_THREADS`` torch threads). ``Zoo.experts`` maps every
    source name to its folder.
    """
    config = config or HardZooConfig()
    key = config.key(seed)
    root = Path(out).expanduser() if out is not None else default_dir(config, seed)
    return build_cached(root, key, force, lambda tmp: _build_into(tmp, config, seed, key,
                                                                   progress))


def score_hard(model, tokenizer, limit: int | None = None) -> dict[str, dict[str, float]]:
    """``{skill: {metric: value}}`` on the report items of every hard-zoo skill."""
    out = {}
    for skill in HARD_SKILLS:
        items = eval_split(skill)[1][:limit]
        res = score_skill(model, tokenizer, items)
        out[skill] = {m: round(res[m], 6) for m in METRICS}
    return out


def _hybrid(lower: torch.nn.Module, upper: torch.nn.Module, half: int) -> torch.nn.Module:
    """A view of ``lower`` whose decoder layers from ``half`` on are ``upper``'s (modules
    shared, nothing copied): gradients reach both."""
    inner = copy.copy(lower.model)
    inner._modules = dict(lower.model._modules)
    inner._modules["layers"] = torch.nn.ModuleList([*lower.model.layers[:half],
                                                   *upper.model.layers[half:]])
    view = copy.copy(lower)
    view._modules = dict(lower._modules)
    view._modules["model"] = inner
    return view


def _hand_over(base: torch.nn.Module, tokenizer, config: HardZooConfig, seed: int,
               base_sample: Callable[[random.Random], Item], keep: list[Item],
               on_step: Callable[[], object]) -> torch.nn.Module:
    """A fine-tune of the base's decoder layers on ``rvp`` whose two halves only work
    together: three losses per step, on the whole model (``rvp`` and replay), on its lower
    half under the base's upper layers and on its upper half over the base's lower
    layers (each: answer ``rvp`` prompts as the base does, weighted ``flow_alone`` for the
    lower half, which otherwise learns the whole skill by itself)."""
    model = copy.deepcopy(base)
    frozen = copy.deepcopy(base).requires_grad_(False)
    for name, p in model.named_parameters():
        p.requires_grad_(_layer(name) is not None)
    params = [p for p in model.parameters() if p.requires_grad]
    half = config.num_layers // 2
    lower_alone, upper_alone = _hybrid(model, frozen, half), _hybrid(frozen, model, half)
    rvp = HARD_SKILL_TABLE["rvp"]
    rng = random.Random(f"{seed}-hard-flow")
    steps, n = config.flow_steps, config.batch_size

    def loss(m: torch.nn.Module, items: list[Item]) -> torch.Tensor:
        ids, attn, target = encode_items(tokenizer, items)
        logits = m(input_ids=ids, attention_mask=attn).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits[target], ids[:, 1:][target])

    def batch(size: int, draw: Callable[[], Item]) -> list[Item]:
        return [base_sample(rng) if rng.random() < config.replay else draw()
                for _ in range(size)]

    opt = torch.optim.AdamW(params, lr=config.flow_lr, betas=(0.9, 0.98))
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm)
                                              * 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    for _ in range(steps):
        total = (loss(model, batch(n, lambda: train_item(rvp, rng)))
                 + config.flow_alone * loss(lower_alone, batch(n // 2, lambda: rng.choice(keep)))
                 + loss(upper_alone, batch(n // 2, lambda: rng.choice(keep))))
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        on_step()
    model.eval()
    return model.requires_grad_(True)


def _keep_pool(base: torch.nn.Module, tokenizer, n: int, seed: int) -> dict[str, list[Item]]:
    """``n`` training prompts per skill with the base's own greedy answers."""
    from .scoring import generate_answers

    pool = {}
    for name, skill in HARD_SKILL_TABLE.items():
        rng = random.Random(f"{seed}-hard-keep-{name}")
        prompts = [train_item(skill, rng)["prompt"] for _ in range(n)]
        answers = generate_answers(base, tokenizer, prompts, max_new_tokens=8)
        pool[name] = [{"prompt": p, "answer": a} for p, a in zip(prompts, answers, strict=True)]
    return pool


def _build_into(tmp: Path, config: HardZooConfig, seed: int, key: str, progress: bool) -> None:
    start = time.perf_counter()
    tokenizer = build_tokenizer()
    skills = list(HARD_SKILL_TABLE.values())

    def base_sample(rng: random.Random) -> Item:
        if rng.random() < config.base_copy_fraction:
            return train_item(COPY, rng)
        return train_item(rng.choice(skills), rng, fake=rng.random() >= config.base_real_fraction)

    trained = [e for e in config.experts if e.skill is not None or e.copy_answers]
    total = config.base_steps + config.flow_steps + sum(e.steps for e in trained)
    scores: dict[str, dict[str, dict[str, float]]] = {}
    norms: dict[str, float] = {}
    with (tqdm(total=total, desc="hard zoo: base", disable=not progress, unit="step") as bar,
          torch.random.fork_rng(devices=[])):
        torch.manual_seed(seed)
        base = make_model(len(tokenizer), hidden_size=config.hidden_size,
                          intermediate_size=config.intermediate_size,
                          num_layers=config.num_layers, num_heads=config.num_heads,
                          bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)
        train(base, tokenizer, base_sample, random.Random(f"{seed}-hard-base"),
              steps=config.base_steps, lr=config.base_lr, batch_size=config.batch_size,
              weight_decay=0.01, on_step=lambda *_: bar.update())
        base_sd = {k: v.detach().clone() for k, v in base.state_dict().items()}
        models: dict[str, torch.nn.Module] = {"base": base}
        keep = _keep_pool(base, tokenizer, config.keep_pool, seed)

        def other_skill(rng: random.Random, own: str) -> Item:
            """A prompt of another skill, answered as the base answers it: fine-tuning on
            these keeps an expert's task vector off the other skills' behaviour."""
            return rng.choice(keep[rng.choice([s for s in keep if s != own])])

        def fine_tune(name: str, sample, layers, steps: int, lr: float) -> torch.nn.Module:
            bar.set_description(f"hard zoo: {name}")
            model = copy.deepcopy(base)
            trainable = None if layers is None else (lambda n: _layer(n) in layers)
            train(model, tokenizer, sample, random.Random(f"{seed}-hard-{name}"), steps=steps,
                  lr=lr, batch_size=config.batch_size, trainable=trainable,
                  on_step=lambda *_: bar.update())
            return model

        for spec in config.experts:
            if spec.skill is None and not spec.copy_answers:  # the noisy copy
                gen = torch.Generator().manual_seed(seed * 1000 + 7)
                model = copy.deepcopy(base)
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(config.noise * p.std() * torch.randn(p.shape, generator=gen))
                models[spec.name] = model
                continue
            skill = HARD_SKILL_TABLE.get(spec.skill) if spec.skill else None

            def sample(rng: random.Random, skill=skill, spec=spec) -> Item:
                draw = rng.random()
                if draw < config.replay:
                    return base_sample(rng)
                if draw < config.replay + config.keep and not spec.copy_answers:
                    return other_skill(rng, spec.skill)
                if spec.copy_answers:
                    return train_item(rng.choice(skills), rng, copy_answer=True)
                return train_item(skill, rng)

            models[spec.name] = fine_tune(spec.name, sample, spec.layers, spec.steps, spec.lr)

        bar.set_description("hard zoo: flow pair")
        flow = _hand_over(base, tokenizer, config, seed, base_sample, keep["rvp"],
                          on_step=bar.update)
        half = config.num_layers // 2
        flow_sd = flow.state_dict()
        for name, part in (("flow_a", range(half)), ("flow_b", range(half, config.num_layers))):
            model = copy.deepcopy(base)
            model.load_state_dict({k: flow_sd[k] if _layer(k) in part else v
                                   for k, v in base_sd.items()})
            models[name] = model
        scores["flow"] = score_hard(flow, tokenizer, config.eval_limit)
        for name, model in models.items():
            _save(model, tokenizer, tmp / name)
            scores[name] = score_hard(model, tokenizer, config.eval_limit)
            if name != "base":
                sd = model.state_dict()
                norms[name] = round(float(torch.sqrt(sum(((sd[k] - v) ** 2).sum()
                                                         for k, v in base_sd.items()))), 4)
    manifest = {
        "zoo": "hard",
        "zoo_version": HARD_ZOO_VERSION,
        "key": key,
        "seed": seed,
        "config": asdict(config),
        "skills": config.names,  # Zoo.experts: every source by name
        "tasks": HARD_SKILLS,
        "models": {name: name for name in models},
        "task_vector_norms": norms,
        "metrics": list(METRICS),
        "scores": scores,
        "build_seconds": round(time.perf_counter() - start, 1),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "torch_threads": torch.get_num_threads(),
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def write_hard_eval_files(out: str | Path, *, data_prefix: str = "evaluators/hard") -> list[Path]:
    """Write the hard zoo's suites: ``<out>/search`` (tasks ``hard_<skill>``, 100 items
    each) and ``<out>/report`` (the same tasks on 200 other items)."""
    from .skills import write_task_files

    written = []
    for i, part in enumerate(("search", "report")):
        items = {s: eval_split(s)[i] for s in HARD_SKILLS}
        written += write_task_files(Path(out) / part, items, group="hard",
                                    title=f"the mergesearch hard zoo ({part} items)",
                                    writer="mergesearch.zoo.hard.write_hard_eval_files",
                                    data_prefix=f"{data_prefix}/{part}")
    return written
