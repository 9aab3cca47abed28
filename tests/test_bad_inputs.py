"""Bad inputs a user can give the CLI: each is refused with exit status 2 (1 when every
trial of a run failed), one ``error:`` line naming the field or file, and nothing new on
disk (no study, no output, no temporary directory)."""

from __future__ import annotations

import errno
import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from helpers import perturbed, save, tiny_config, tiny_tokenizer
from transformers import LlamaForCausalLM

from mergesearch.cli import main
from mergesearch.execution import Worker
from mergesearch.trial import Result

ROOT = Path(__file__).resolve().parents[1]


class FailingWorker(Worker):
    """Every candidate fails (as a broken evaluator would)."""

    def evaluate(self, candidate):
        return Result.failed(candidate.id, "RuntimeError: the evaluator broke")


class NaNWorker(Worker):
    """Candidate 1's merged model has NaN embeddings: its logits (and generations) are NaN."""

    def evaluate(self, candidate):
        if candidate.id != 1:
            return super().evaluate(candidate)
        apply = self.merger.apply

        def poisoned(recipe, **kwargs):
            model = apply(recipe, **kwargs)
            model.get_input_embeddings().weight.data.fill_(float("nan"))
            return model

        self.merger.apply = poisoned
        try:
            return super().evaluate(candidate)
        finally:
            del self.merger.apply  # the class's method again


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A tiny base (its tokenizer has an end-of-sequence token, as generation tasks need),
    two fine-tunes of it and a pickle-only one."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_config())
    out = {"base": Path(save(base, root / "base"))}
    tok = tiny_tokenizer()
    tok.eos_token = "<pad>"
    tok.save_pretrained(out["base"])
    for s in (1, 2):
        out[f"src{s}"] = Path(save(perturbed(base, s), root / f"src{s}"))
    out["pickle"] = Path(save(perturbed(base, 3), root / "pickle", safe=False))
    return out


def experiment(found: dict[str, Path], tmp: Path, **changes) -> dict:
    data = {
        "name": "tiny",
        "models": {"base": str(found["base"]),
                   "sources": {"a": str(found["src1"]), "b": str(found["src2"])}},
        "space": str(ROOT / "search_spaces" / "task_arithmetic.yaml"),
        "strategy": {"name": "random"},
        "evaluator": {"suite": str(ROOT / "evaluators" / "zoo"), "limit": 2, "batch_size": 8,
                      "objectives": [{"name": "rev", "tasks": ["zoo_rev"],
                                      "metric": "char_accuracy"}]},
        "budget": {"evaluations": 2},
        "output": str(tmp / "run"),
    }
    return data | changes


@pytest.fixture(scope="module")
def study(models, tmp_path_factory) -> Path:
    """An experiment file whose study holds two finished trials (for `export`)."""
    root = tmp_path_factory.mktemp("study")
    (root / "run").mkdir()
    path = root / "exp.yaml"
    path.write_text(yaml.safe_dump(experiment(models, root)))
    assert main(["run", str(path), "-q"]) == 0
    assert main(["status", str(path)]) == 0  # a first reader folds SQLite's log into the file
    return path


@dataclass
class Ctx:
    """What a case may use: a fresh folder, the tiny models, the study, monkeypatch."""

    tmp: Path
    models: dict[str, Path]
    study: Path | None
    monkeypatch: pytest.MonkeyPatch

    def write(self, name: str, content: str | dict) -> str:
        path = self.tmp / name
        path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
        return str(path)

    def exp(self, **changes) -> str:
        return self.write("exp.yaml", experiment(self.models, self.tmp, **changes))

    def exp_text(self, old: str, new: str) -> str:
        text = yaml.safe_dump(experiment(self.models, self.tmp), sort_keys=False)
        assert old in text
        return self.write("exp.yaml", text.replace(old, new, 1))

    def evaluator(self, **changes) -> str:
        data = experiment(self.models, self.tmp)
        return self.exp(evaluator=data["evaluator"] | changes)

    def suite(self, data: str, rows: list[dict] | None = None) -> str:
        """A suite of one generation task whose data file is ``data`` (holding ``rows``;
        not written without them)."""
        (self.tmp / "suite").mkdir()
        self.write("suite/mine.yaml", {
            "task": "mine", "dataset_path": "json", "test_split": "test",
            "dataset_kwargs": {"data_files": {"test": data}}, "target_delimiter": "",
            "generation_kwargs": {"max_gen_toks": 4},
            "doc_to_text": "{{prompt}}", "doc_to_target": "{{answer}}"})
        if rows is not None:
            self.write(f"suite/{data}", "".join(json.dumps(r) + "\n" for r in rows))
        return str(self.tmp / "suite")

    def with_models(self, allow_pickle: bool = False, **refs: Path) -> str:
        names = {"base": self.models["base"], "a": self.models["src1"],
                 "b": self.models["src2"]} | refs
        return self.exp(models={"base": str(names.pop("base")),
                                "sources": {k: str(v) for k, v in names.items()},
                                "allow_pickle": allow_pickle})

    def recipe(self, data: str | dict, name: str = "recipe.yaml") -> str:
        return self.write(name, data)

    def linear(self, model: Path | None = None) -> str:
        return self.recipe({"method": "linear", "models": [
            {"model": str(model or self.models["src1"]), "parameters": {"weight": 1.0}},
            {"model": str(self.models["src2"]), "parameters": {"weight": 1.0}}]})

    def copy_model(self, name: str, src: str = "src1") -> Path:
        # beside the models, not in tmp: an input folder, like a user's download
        dest = self.tmp / "bad_models" / name
        shutil.copytree(self.models[src], dest)
        return dest

    def fail_writes(self, code: int) -> None:
        def refuse(*args, **kwargs):
            raise OSError(code, f"simulated {errno.errorcode[code]}")

        self.monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", refuse)
        self.monkeypatch.setattr("mergesearch.models.sinks.save_file", refuse)  # streamed export


def more_layers_than_tensors(ctx: Ctx) -> Path:
    model = ctx.copy_model("deeper-config", "base")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 4}))
    return model


def truncated(ctx: Ctx) -> Path:
    model = ctx.copy_model("truncated")
    f = model / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return model


def missing_shard(ctx: Ctx) -> Path:
    from safetensors import safe_open

    model = ctx.copy_model("sharded")
    first = model / "model-00001-of-00002.safetensors"
    (model / "model.safetensors").rename(first)
    with safe_open(first, "pt") as f:
        names = list(f.keys())
    weight_map = {n: first.name if i < 5 else "model-00002-of-00002.safetensors"
                  for i, n in enumerate(names)}
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return model


def garbage(ctx: Ctx, src: str, file: str, content: bytes) -> Path:
    model = ctx.copy_model(f"garbage-{src}", src)
    (model / file).write_bytes(content)
    return model


def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "simulated ENOSPC")


def evil_pickle(ctx: Ctx) -> Path:
    import argparse

    model = ctx.copy_model("evil", "pickle")
    torch.save({"x": argparse.Namespace(a=1)}, model / "pytorch_model.bin")  # not a tensor
    return model


MK_LINEAR = {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1}}]}


def passthrough(layer_range) -> dict:
    return {"merge_method": "passthrough",
            "slices": [{"sources": [{"model": "a", "layer_range": layer_range}]}]}


Case = Callable[[Ctx], list[str]]
TIES = "method: ties\nbase: b\nmodels:\n  - model: a\n    parameters: {weight: 1.0, density: %s}\n"

# case -> (argv builder, what the error line must name)
CASES: dict[str, tuple[Case, str]] = {
    # --- experiments (`run`)
    "duplicate source name": (lambda c: ["run", c.exp_text("b: ", "a: ")],
                              "key 'a' is given twice"),
    "duplicate top-level key": (lambda c: ["run", c.exp_text("name: tiny\n",
                                                             "name: tiny\nname: other\n")],
                                "key 'name' is given twice"),
    "budget evaluations: true": (lambda c: ["run", c.exp(budget={"evaluations": True})],
                                 "budget.evaluations"),
    "--set budget.evaluations=true": (
        lambda c: ["run", c.exp(), "--set", "budget.evaluations=true"], "budget.evaluations"),
    "seed: true": (lambda c: ["run", c.exp(seed=True)], "seed"),
    "execution.workers: true": (lambda c: ["run", c.exp(execution={"workers": True})],
                                "execution.workers"),
    "wall_time 1.2.3m": (lambda c: ["run", c.exp(budget={"wall_time": "1.2.3m"})],
                         "budget.wall_time: not a duration: '1.2.3m'"),
    "storage folder missing": (
        lambda c: ["run", c.exp(storage=f"sqlite:///{c.tmp / 'nowhere' / 'x.db'}")],
        f"storage: the folder {'{tmp}'}/nowhere"),
    "name ..": (lambda c: ["run", c.exp(name="..", output=None)], "name: '..'"),
    "name .": (lambda c: ["run", c.exp(name=".", output=None)], "name: '.'"),
    "--study ..": (lambda c: ["run", c.exp(), "--study", ".."], "--study '..' is not a usable"),
    "output ''": (lambda c: ["run", c.exp(output="")], "output"),
    "output under a file": (lambda c: (c.write("afile", "x"),
                                       ["run", c.exp(output=str(c.tmp / "afile" / "run"))])[1],
                            "output: {tmp}/afile is a file"),
    "space file with a duplicate key": (
        lambda c: ["run", c.exp(space=c.write("space.yaml", (
            ROOT / "search_spaces" / "task_arithmetic.yaml").read_text().replace(
                "method: task_arithmetic", "method: task_arithmetic\nmethod: ties")))],
        "key 'method' is given twice"),
    "sweep file with a duplicate key": (
        lambda c: ["sweep", c.write("sweep.yaml", f"experiment: {c.exp()}\n"
                                    "grid: {seed: [0, 1]}\ngrid: {seed: [2]}\n")],
        "key 'grid' is given twice"),
    "sweep label ..": (
        lambda c: ["sweep", c.write("sweep.yaml", f"name: ..\nexperiment: {c.exp()}\n"
                                    "grid: {seed: [0]}\n")], "name: '..'"),
    "run: truncated safetensors source": (lambda c: ["run", c.with_models(a=truncated(c))],
                                          "bad_models/truncated/model.safetensors"),
    "run: corrupt base": (
        lambda c: ["run", c.with_models(base=garbage(c, "base", "model.safetensors", b"\0" * 64))],
        "bad_models/garbage-base/model.safetensors: not a readable safetensors file"),
    "run: index names a missing shard": (
        lambda c: ["run", c.with_models(a=missing_shard(c))],
        "model.safetensors.index.json: names the shard model-00002-of-00002.safetensors"),
    "run: pickle refused by the safe loader": (
        lambda c: ["run", c.with_models(a=evil_pickle(c), allow_pickle=True)],
        "bad_models/evil/pytorch_model.bin: refused by the safe pickle loader"),
    "infinite bounds": (
        lambda c: ["run", c.exp(space={"method": "task_arithmetic", "parameters": {
            "weight": {"bounds": [0.0, float("inf")]}}})],
        "space.parameters.weight.bounds: [0.0, inf] must be finite"),
    "unknown device": (lambda c: ["run", c.exp(execution={"device": "cude"})],
                       "execution.device: 'cude' is not a device"),
    "absent device": (lambda c: ["run", c.exp(execution={"device": "cuda:7"})],
                      "execution.device: 'cuda:7'"),
    "missing relative model path": (
        lambda c: (c.monkeypatch.chdir(c.tmp), (c.tmp / "models").mkdir(),
                   ["run", c.exp(models={"base": str(c.models["base"]),
                                         "sources": {"a": "models/math"}})])[-1],
        "models: 'models/math' not found"),
    "base claims more layers than its tensors": (
        lambda c: ["run", c.with_models(base=more_layers_than_tensors(c))],
        "config says 4 layers, tensors have 3"),
    # --- the evaluator (hf backend): checked against the suite before any worker starts
    "unknown task": (lambda c: ["run", c.evaluator(tasks=["zoo_rev", "zoo_mul"])],
                     "evaluator.tasks names unknown tasks ['zoo_mul']; the suite"),
    "lm_eval: unknown task in the include path": (
        lambda c: ["run", c.evaluator(backend="lm_eval", lm_eval={"tasks": ["zoo_mul"]})],
        "evaluator.lm_eval.tasks: unknown tasks ['zoo_mul'] in the include path"),
    "objective: unknown task": (
        lambda c: ["run", c.evaluator(objectives=[{"name": "o", "metric": "char_accuracy",
                                                   "tasks": ["zoo_mul"]}])],
        "objective 'o' names tasks ['zoo_mul'] that the evaluator does not load"),
    "objective: a metric the task does not produce": (
        lambda c: ["run", c.evaluator(objectives=[{"name": "o", "metric": "acc",
                                                   "tasks": ["zoo_rev"]}])],
        "objective 'o': metric 'acc' cannot be computed for task 'zoo_rev' (generate_until)"),
    "track: a metric the task does not produce": (
        lambda c: ["run", c.evaluator(track=["zoo_rev/acc_norm"])],
        "evaluator.track: 'zoo_rev/acc_norm': task 'zoo_rev' (generate_until) does not "
        "produce 'acc_norm'"),
    "track: a metric no task produces": (
        lambda c: ["run", c.evaluator(track=["exact_match", "bleu"])],
        "evaluator.track: no task of the evaluator produces 'bleu'"),
    "track: unknown task": (
        lambda c: ["run", c.evaluator(track=["zoo_mul/exact_match"])],
        "evaluator.track: 'zoo_mul/exact_match' names task 'zoo_mul', which the evaluator "
        "does not load"),
    "data file missing": (
        lambda c: ["run", c.evaluator(suite=c.suite(data="missing.jsonl"))],
        "task 'mine' ({tmp}/suite/mine.yaml): data file 'missing.jsonl' not found"),
    "unknown suite": (lambda c: ["run", c.evaluator(suite=str(c.tmp / "no-suite"))],
                      "evaluator.suite: "),
    # --- recipes and mergekit configs (`convert`, `merge`)
    "density .nan": (lambda c: ["convert", c.recipe(TIES % ".nan")],
                     "models.0.parameters.density: nan is not a usable value"),
    "weight .inf (merge)": (
        lambda c: ["merge", c.recipe(TIES.replace("weight: 1.0", "weight: .inf") % "0.5"),
                   str(c.tmp / "out")], "parameters.weight: inf is not a usable value"),
    "NaN in a gradient": (
        lambda c: ["convert", c.recipe(TIES.replace("weight: 1.0", "weight: [0.1, .nan]")
                                       % "0.5")], "parameters.weight: nan"),
    "NaN in a filtered value": (
        lambda c: ["convert", c.recipe(TIES.replace(
            "weight: 1.0", "weight: [{filter: mlp, value: .nan}]") % "0.5")],
        "parameters.weight: nan"),
    "layer-path scale .nan": (
        lambda c: ["convert", c.recipe("method: passthrough\nlayer_path:\n"
                                       "  - {model: a, layer: 0, scale: .nan}\n")],
        "layer_path.0.scale"),
    "recipe seed: true": (lambda c: ["convert", c.recipe((TIES % "0.5") + "seed: true\n")],
                          "recipe.seed"),
    "recipe duplicate key": (lambda c: ["convert", c.recipe((TIES % "0.5") + "base: c\n")],
                             "key 'base' is given twice"),
    "recipe JSON duplicate key": (
        lambda c: ["convert", c.recipe('{"method": "linear", "method": "ties"}', "r.json")],
        "r.json: not valid JSON: key 'method' is given twice"),
    "mergekit duplicate parameter": (
        lambda c: ["convert", c.recipe("merge_method: linear\nmodels:\n  - model: a\n"
                                       "    parameters: {weight: 1, weight: 2}\n")],
        "key 'weight' is given twice"),
    "mergekit slice without layer_range": (
        lambda c: ["convert", c.recipe({"merge_method": "passthrough",
                                        "slices": [{"sources": [{"model": "a"}]}]})],
        "mergekit.slices.0.sources.0.layer_range: Field required"),
    "mergekit layer_range [3]": (lambda c: ["convert", c.recipe(passthrough([3]))],
                                 "slices.0.sources.0.layer_range"),
    "mergekit layer_range [3, 1]": (lambda c: ["merge", c.recipe(passthrough([3, 1])),
                                               str(c.tmp / "out")],
                                    "layer_range: [3, 1] is not a layer range"),
    "mergekit layer_range [-1, 2]": (lambda c: ["convert", c.recipe(passthrough([-1, 2]))],
                                     "layer_range: [-1, 2] is not a layer range"),
    "mergekit models entry without model": (
        lambda c: ["convert", c.recipe({"merge_method": "linear",
                                        "models": [{"parameters": {"weight": 1}}]})],
        "mergekit.models.0.model: Field required"),
    "mergekit models as a string": (
        lambda c: ["convert", c.recipe({"merge_method": "linear", "models": "a"})],
        "mergekit.models: Input should be a valid list"),
    "mergekit models entry a string": (
        lambda c: ["convert", c.recipe({"merge_method": "linear", "models": ["a"]})],
        "mergekit.models.0: expected a mapping"),
    # --- where output goes
    "convert -o DIR": (lambda c: ((c.tmp / "d").mkdir(),
                                  ["convert", c.recipe(MK_LINEAR), "-o", str(c.tmp / "d")])[1],
                       "cannot write {tmp}/d: it is a directory"),
    "convert -o under a file": (
        lambda c: ["convert", c.recipe(MK_LINEAR), "-o", str(Path(c.recipe(MK_LINEAR)) / "x")],
        "recipe.yaml is a file, not a directory"),
    "convert -o ''": (lambda c: ["convert", c.recipe(MK_LINEAR), "-o", ""],
                      "the output path is empty"),
    "convert -o on a full disk": (
        lambda c: (c.monkeypatch.setattr("mergesearch.atomic.tempfile.mkstemp", full_disk),
                   ["convert", c.recipe(MK_LINEAR), "-o", str(c.tmp / "new" / "mk.yml")])[1],
        "cannot write {tmp}/new/mk.yml: no space left"),
    "merge under a regular file": (
        lambda c: ["merge", c.linear(), str(Path(c.linear()) / "out")],
        "recipe.yaml is a file, not a directory"),
    "merge to ''": (lambda c: ["merge", c.linear(), ""], "the output path is empty"),
    "merge to the current directory": (lambda c: ["merge", c.linear(), ".", "--overwrite"],
                                       "the output path is empty or '.'"),
    "merge to a parent of the current directory": (
        lambda c: ["merge", c.linear(), "..", "--overwrite"],
        ".. is the current directory or one above it"),
    "merge --overwrite onto a source": (
        lambda c: ["merge", c.linear(), str(c.models["src1"]), "--overwrite"],
        "would replace the input model"),
    "merge --overwrite onto the models' folder": (
        lambda c: ["merge", c.linear(), str(c.models["src1"].parent), "--overwrite"],
        "would replace the input model"),
    "merge on a full disk": (lambda c: (c.fail_writes(errno.ENOSPC),
                                        ["merge", c.linear(), str(c.tmp / "out")])[1],
                             "cannot write {tmp}/out: no space left"),
    "merge to a read-only file system": (
        lambda c: (c.fail_writes(errno.EROFS), ["merge", c.linear(), str(c.tmp / "out")])[1],
        "cannot write {tmp}/out: the file system is read-only"),
    "merge without permission": (
        lambda c: (c.fail_writes(errno.EACCES), ["merge", c.linear(), str(c.tmp / "out")])[1],
        "cannot write {tmp}/out: permission denied"),
    "merge: truncated safetensors": (
        lambda c: ["merge", c.linear(truncated(c)), str(c.tmp / "out")],
        "bad_models/truncated/model.safetensors: not a readable safetensors file"),
    "merge: index names a missing shard": (
        lambda c: ["merge", c.linear(missing_shard(c)), str(c.tmp / "out")],
        "names the shard model-00002-of-00002.safetensors, which is missing"),
    "merge: unreadable index": (
        lambda c: ["merge", c.linear(garbage(c, "src1", "model.safetensors.index.json", b"{")),
                   str(c.tmp / "out")], "model.safetensors.index.json: not a valid index"),
    "merge --allow-pickle: refused by the safe loader": (
        lambda c: ["merge", c.linear(evil_pickle(c)), str(c.tmp / "out"), "--allow-pickle"],
        "bad_models/evil/pytorch_model.bin: refused by the safe pickle loader"),
    "merge --allow-pickle: not a torch file": (
        lambda c: ["merge", c.linear(garbage(c, "pickle", "pytorch_model.bin", b"PK\3\4junk")),
                   str(c.tmp / "out"), "--allow-pickle"],
        "bad_models/garbage-pickle/pytorch_model.bin: cannot be read as a torch checkpoint"),
    # --- export (needs a study)
    "export --out an existing folder": (
        lambda c: ((c.tmp / "mine").mkdir(), c.write("mine/notes.txt", "the user's file"),
                   ["export", str(c.study), "--out", str(c.tmp / "mine")])[-1],
        "exists and is not empty; pass --overwrite"),
    "export --out under a file": (
        lambda c: ["export", str(c.study), "--out", str(Path(c.write("f", "x")) / "o")],
        "{tmp}/f is a file, not a directory"),
    "export --out ''": (lambda c: ["export", str(c.study), "--out", ""],
                        "the output path is empty"),
    "export --checkpoint on a full disk": (
        lambda c: (c.fail_writes(errno.ENOSPC),
                   ["export", str(c.study), "--out", str(c.tmp / "exp"), "--checkpoint"])[1],
        "cannot write {tmp}/exp/model: no space left"),
    "export --overwrite onto an input model": (
        lambda c: ["export", str(c.study), "--out", str(c.models["src2"]), "--overwrite"],
        "would replace the input model"),
}
NEEDS_STUDY = {k for k in CASES if k.startswith("export")}


def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every path under ``roots``: files with size and modification time, folders by name
    (a folder's own time changes when a temporary entry comes and goes)."""
    out = {}
    for root in roots:
        for p in root.rglob("*"):
            if p.name.endswith(("-wal", "-shm")):  # SQLite's side files of an open study
                continue
            st = p.stat()
            if p.is_dir():
                out[str(p)] = ("dir",)
            elif p.suffix == ".db":  # a reader's close may fold the WAL in: compare rows
                out[str(p)] = ("sqlite", _rows(p))
            else:
                out[str(p)] = (st.st_size, st.st_mtime_ns)
    return out


def _rows(db: Path) -> int:
    import sqlite3
    import zlib

    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        return zlib.crc32("\n".join(con.iterdump()).encode())


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_in_one_line_and_writes_nothing(case, models, tmp_path,
                                                             monkeypatch, capsys, request):
    build, message = CASES[case]
    study = request.getfixturevalue("study") if case in NEEDS_STUDY else None
    monkeypatch.chdir(tmp_path)  # default run folders (runs/<name>) land in tmp_path too
    ctx = Ctx(tmp_path, models, study, monkeypatch)
    argv = build(ctx)
    roots = [tmp_path, models["base"].parent] + ([study.parent] if study else [])
    before = snapshot(*roots)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert message.replace("{tmp}", str(tmp_path)) in lines[0]
    assert snapshot(*roots) == before


def test_a_run_where_every_trial_failed_exits_1_with_the_last_reason(models, tmp_path,
                                                                     monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run").mkdir()
    path = Ctx(tmp_path, models, None, monkeypatch).exp(
        execution={"worker_class": "test_bad_inputs:FailingWorker"})
    assert main(["run", path, "-q"]) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: every trial failed (2)"), captured.err
    assert "RuntimeError: the evaluator broke" in lines[0]
    assert "0 ok, 2 failed" in captured.out
    assert (tmp_path / "run" / "study.db").exists()  # the failures are recorded ...
    assert not (tmp_path / "run" / "front").exists()  # ... and there is no front to export


@pytest.mark.slow  # four candidates, with generation
def test_a_candidate_with_nan_logits_is_a_failed_trial_and_the_search_goes_on(
        models, tmp_path, monkeypatch, capsys):
    """Its generations (exact match needs them) are skipped, its objective is NaN: the trial
    is recorded as failed with the reason, and the other candidates complete."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run").mkdir()
    ctx = Ctx(tmp_path, models, None, monkeypatch)
    rows = [{"prompt": f"rev {w}=", "answer": w[::-1]} for w in ("ab", "abc", "ba")]
    evaluator = experiment(models, tmp_path)["evaluator"] | {
        "suite": ctx.suite("mine.jsonl", rows),
        "objectives": [{"name": "em", "metric": "exact_match"}],
        "track": ["mine/char_accuracy"]}
    path = ctx.exp(evaluator=evaluator, budget={"evaluations": 4},
                   execution={"worker_class": "test_bad_inputs:NaNWorker"})
    assert main(["run", path, "-q"]) == 0
    assert "4 trials (3 ok, 1 failed" in capsys.readouterr().out
    from mergesearch.storage import TrialStore

    trials = {t.candidate_id: t for t in TrialStore.open(
        f"sqlite:///{tmp_path / 'run' / 'study.db'}", "tiny").trials()}
    assert trials[1].state == "failed"
    assert trials[1].reason == "non-finite objective values: em"
    assert trials[1].tracked == {}
    assert all(math.isnan(v) for v in trials[1].scores["mine"].values())
    for i in (0, 2, 3):  # the next merge overwrote the NaN weights
        assert trials[i].state == "ok" and math.isfinite(trials[i].values["em"])
        assert trials[i].tracked == {
            "mine/char_accuracy": trials[i].scores["mine"]["char_accuracy"]}
    assert main(["status", path]) == 0
    assert "trial 1 failed: non-finite objective values: em" in capsys.readouterr().out


def test_lm_eval_task_names_are_refused_before_any_worker_starts(models, tmp_path,
                                                                  monkeypatch, capsys):
    """An unknown lm-eval task in the include path is refused by the controller, without
    building the lm-eval evaluator (which imports lm-eval and indexes its tasks)."""
    from mergesearch.evaluation import lm_eval_backend

    def started(*args, **kwargs):
        raise AssertionError("the lm-eval evaluator was built")

    monkeypatch.setattr(lm_eval_backend.LMEvalEvaluator, "__init__", started)
    monkeypatch.chdir(tmp_path)
    ctx = Ctx(tmp_path, models, None, monkeypatch)
    argv = ["run", ctx.evaluator(backend="lm_eval", lm_eval={"tasks": ["zoo_mul"]})]
    assert main(argv) == 2
    assert "evaluator.lm_eval.tasks: unknown tasks ['zoo_mul']" in capsys.readouterr().err
