"""Every search experiment shipped for the zoo and the hard zoo runs end to end through
``mergesearch run`` with a small budget (``--set budget.evaluations=N``, and per stage)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mergesearch.storage import TrialStore

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted(p.relative_to(ROOT).as_posix() for folder in ("zoo", "hard")
               for p in (ROOT / "experiments" / folder).glob("*.yaml"))


@pytest.mark.slow
@pytest.mark.parametrize("name", FILES)
def test_a_shipped_experiment_runs_with_a_small_budget(name, zoo, hard_zoo, tmp_path,
                                                       monkeypatch):
    from mergesearch.cli import main
    from mergesearch.experiment import Experiment

    monkeypatch.chdir(tmp_path)
    sets = ["budget.evaluations=3", "evaluator.limit=8"]
    data = yaml.safe_load((ROOT / name).read_text())
    if (data.get("evaluator") or {}).get("backend") == "vllm":
        pytest.importorskip("vllm", reason="backend vllm runs in .venv-vllm (scripts/vllm_env.sh);"
                            " tests/evaluation/test_vllm.py runs this experiment there")
    for stage in data.get("stages") or ():
        if "budget" in stage:
            sets.append(f"stages.{stage['name']}.budget.evaluations=3")
    args = ["run", str(ROOT / name), "-q", *[x for s in sets for x in ("--set", s)]]
    assert main(args) == 0
    exp = Experiment.load(ROOT / name, sets)
    studies = [exp.name] if not exp.stages else [f"{exp.name}.{s.name}" for s in exp.stages]
    for study in studies:
        trials = TrialStore.open(exp.storage_url, study).trials()
        assert len(trials) == 3 and all(t.state == "ok" for t in trials), study
