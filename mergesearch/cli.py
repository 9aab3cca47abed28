"""``mergesearch`` command line: parse, call the library, print.

Every command is also a Python call; errors a user can cause print one line
and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

EXIT_USAGE = 2


def _cmd_merge(args: argparse.Namespace) -> int:
    from mergesearch.export import load_config, save_merged

    recipe = load_config(args.config)
    out = save_merged(
        recipe, args.out_dir, device=args.device, overwrite=args.overwrite,
        allow_pickle=args.allow_pickle, progress=True,
    )
    print(f"merged {recipe.method} of {len(recipe.model_names)} model(s) -> {out}")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from mergesearch.export import load_config, to_mergekit_yaml

    recipe = load_config(args.config)
    text = to_mergekit_yaml(recipe) if args.to == "mergekit" else recipe.to_yaml()
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    from mergesearch.merging import methods

    for name, method in methods().items():
        params = ", ".join(
            p.name + ("*" if p.per_model else "") + ("" if p.default is not None else "!")
            for p in method.params
        )
        print(f"{name:18} {method.doc}")
        if params:
            print(f"{'':18} parameters: {params}")
    print("\n* per model (may also be set once in 'parameters' for all)   ! required")
    return 0


def _cmd_zoo_build(args: argparse.Namespace) -> int:
    from mergesearch.zoo import build_zoo

    zoo = build_zoo(args.out, seed=args.seed, force=args.force)
    print(f"zoo ready at {zoo.root}")
    print(f"  base    {zoo.base}")
    for skill, path in zoo.experts.items():
        print(f"  {skill:7} {path}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from mergesearch.zoo.build import METRICS
    from mergesearch.zoo.demo import run_demo

    result = run_demo(args.out)
    skills = result.zoo.skills
    for metric in METRICS[:2]:
        print(f"\n{metric} per skill (held-out items)")
        print(f"{'model':28}" + "".join(f"{s:>9}" for s in skills) + f"{'mean':>9}")
        for row, by_skill in result.scores.items():
            values = [by_skill[s][metric] for s in skills]
            cells = "".join(f"{v:9.3f}" for v in values)
            print(f"{row:28}{cells}{sum(values) / len(values):9.3f}")
    print(f"\nzoo:         {result.zoo.root}")
    print(f"merged model: {result.checkpoint} (recipe and mergekit YAML beside it)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mergesearch", description="Search for model-merge recipes automatically."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("merge", help="merge models from a recipe or a mergekit YAML",
                       description="Merge the models of CONFIG (a mergesearch recipe, .yaml or "
                       ".json, or a mergekit YAML) and write a Hugging Face checkpoint.")
    p.add_argument("config", help="recipe file or mergekit YAML")
    p.add_argument("out_dir", help="directory for the merged checkpoint (written atomically)")
    p.add_argument("--device", default="cpu", help="where to merge: cpu, cuda, cuda:1 ...")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--allow-pickle", action="store_true",
                   help="also load pickle checkpoints (.bin/.pt); only for files you trust")
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser("convert", help="convert between recipe and mergekit YAML")
    p.add_argument("config", help="recipe file or mergekit YAML")
    p.add_argument("--to", choices=["mergekit", "recipe"], default="mergekit")
    p.add_argument("-o", "--output", help="write here instead of standard output")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("demo", help="build the zoo, merge its experts, score and export",
                       description="The demo job: build (or reuse) the tiny model zoo, merge "
                       "its experts uniformly with task arithmetic, TIES and DARE-TIES, score "
                       "every model on every skill and export the task-arithmetic merge.")
    p.add_argument("--out", default="runs/demo", help="where to write the merged checkpoint")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("methods", help="list the merge methods and their parameters")
    p.set_defaults(func=_cmd_methods)

    zoo = sub.add_parser("zoo", help="the built-in tiny model zoo")
    zsub = zoo.add_subparsers(dest="zoo_command", required=True)
    p = zsub.add_parser("build", help="build (or reuse) the tiny model zoo")
    p.add_argument("--out", help="where to build it (default: $MERGESEARCH_ZOO or the cache)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="rebuild even if a build exists")
    p.set_defaults(func=_cmd_zoo_build)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from mergesearch.export import NotExpressible  # noqa: F401  (a RecipeError)
    from mergesearch.models.checkpoint import ModelLoadError
    from mergesearch.recipe import RecipeError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (RecipeError, ModelLoadError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
