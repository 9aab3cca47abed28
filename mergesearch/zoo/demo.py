"""The demo job: build the zoo, merge its experts a few ways, score and export.

Until the search lands this is what ``mergesearch demo`` runs: it shows the
merge engine end to end on the built-in models in a few minutes on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mergesearch.export import save_checkpoint, to_mergekit_yaml
from mergesearch.models.resident import ResidentMerger
from mergesearch.recipe import Recipe
from mergesearch.zoo.build import Zoo, build_zoo, score_all


@dataclass
class DemoResult:
    zoo: Zoo
    scores: dict[str, dict[str, dict[str, float]]]  # row -> skill -> metric -> value
    checkpoint: Path


def demo_recipes(zoo: Zoo) -> dict[str, Recipe]:
    """Uniform merges of every expert, one per method family."""
    weight = zoo.manifest["config"]["merge_weight"]
    models = [str(p) for p in zoo.experts.values()]

    def recipe(method: str, **per_model) -> Recipe:
        return Recipe.from_dict({
            "method": method, "base": str(zoo.base),
            "models": [{"model": m, "parameters": {"weight": weight, **per_model}}
                       for m in models],
        })

    return {
        f"task_arithmetic (w={weight:g})": recipe("task_arithmetic"),
        "ties (density 0.5)": recipe("ties", density=0.5),
        "dare_ties (density 0.5)": recipe("dare_ties", density=0.5),
    }


def run_demo(out: str | Path = "runs/demo", *, progress: bool = True) -> DemoResult:
    """Score base, experts and uniform merges on every skill; export the first merge."""
    zoo = build_zoo(progress=progress)
    tokenizer = zoo.load_tokenizer()
    scores = {"base": score_all(zoo.load_model("base"), tokenizer, zoo.skills)}
    for skill in zoo.skills:
        scores[f"expert:{skill}"] = score_all(zoo.load_model(skill), tokenizer, zoo.skills)
    merger = ResidentMerger()
    recipes = demo_recipes(zoo)
    for name, recipe in recipes.items():
        scores[name] = score_all(merger.apply(recipe), tokenizer, zoo.skills)
    first = next(iter(recipes.values()))
    out = Path(out)
    checkpoint = save_checkpoint(merger.apply(first), out / "merged", recipe=first,
                                 overwrite=True)
    (out / "recipe.yaml").write_text(first.to_yaml())
    (out / "mergekit.yml").write_text(to_mergekit_yaml(first))
    return DemoResult(zoo=zoo, scores=scores, checkpoint=checkpoint)
