"""The gradient-cosine probe: its payload against cosines computed independently (a fresh
merge, the items tokenised here, torch.autograd, the task vectors read from the files)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from mergesearch.execution import probes
from mergesearch.execution.fw_probe import PROBE, TOTAL
from mergesearch.execution.worker import Worker, WorkerSpec
from mergesearch.models.resident import merge
from mergesearch.recipe import Recipe
from mergesearch.trial import Candidate

ROOT = Path(__file__).resolve().parents[2]
N_ITEMS = 6
TASKS = {"zoo_rev": "rev", "zoo_dup": "dup"}


def tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out |= load_file(str(f))
    return out


@pytest.mark.slow
def test_payload_equals_autograd_cosines_on_the_same_merge(zoo):
    refs = [str(zoo.experts[s]) for s in ("rev", "srt", "dup")]
    recipe = Recipe.from_dict({"method": "task_arithmetic", "base": str(zoo.base),
                               "models": [{"model": r, "parameters": {"weight": w}}
                                          for r, w in zip(refs, (0.4, 0.1, 0.3), strict=True)],
                               "parameters": {"normalize": False}})
    worker = Worker(WorkerSpec(tokenizer=str(zoo.base), evaluator={
        "suite": str(ROOT / "evaluators/zoo"), "tasks": list(TASKS),
        "objectives": [{"name": "m", "metric": "char_accuracy"}]}))
    cand = Candidate(id=0, genome=None, kind=PROBE, recipe=recipe,
                     meta={"base": str(zoo.base), "pool": refs, "proxy_items": N_ITEMS})
    result = worker.evaluate(cand)
    assert result.ok, result.reason
    payload = result.payload
    assert result.cost == 3 * N_ITEMS * len(TASKS)
    assert payload["sources"] == refs and payload["keys"] == [*TASKS, TOTAL]

    # independently: a fresh merged model, the first items of each file, autograd
    model = merge(recipe)
    tok = AutoTokenizer.from_pretrained(str(zoo.base))
    params = dict(model.named_parameters())
    grads = {}
    for task, skill in TASKS.items():
        lines = (ROOT / f"evaluators/zoo/{skill}.jsonl").read_text().splitlines()[:N_ITEMS]
        total, count = 0.0, 0
        for line in lines:
            doc = json.loads(line)
            ctx = tok(doc["prompt"])["input_ids"]
            ans = tok(doc["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            ids = torch.tensor([ctx + ans])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            for j, t in enumerate(ans):
                total = total - logp[len(ctx) - 1 + j, t]
            count += len(ans)
        model.zero_grad()
        (total / count).backward()
        grads[task] = {n: p.grad.clone() for n, p in params.items()}
        assert payload["loss"][task] == pytest.approx(float(total / count), rel=1e-5)
    grads[TOTAL] = {n: sum(grads[t][n] for t in TASKS) for n in params}
    base = tensors(zoo.base)
    assert payload["tensors"] == [n for n in params if n in base]
    for i, ref in enumerate(refs):
        theta = tensors(Path(ref))
        for p, name in enumerate(payload["tensors"]):
            tau = (theta[name] - base[name]).float().reshape(-1)
            for key in (*TASKS, TOTAL):
                g = grads[key][name].reshape(-1)
                cos = float(torch.nn.functional.cosine_similarity(g, tau, dim=0))
                assert payload["cos"][key][i][p] == pytest.approx(cos, abs=2e-4), (ref, name)
                assert payload["dot"][key][i][p] == pytest.approx(float(g @ tau), rel=1e-3,
                                                                  abs=1e-6)
            assert payload["tnorm"][i][p] == pytest.approx(float(tau.norm()), rel=1e-5)


@pytest.mark.slow  # seconds: kept out of the quick suite, run by CI
def test_probe_refuses_a_candidate_without_its_pool(zoo):
    worker = Worker(WorkerSpec(tokenizer=str(zoo.base), evaluator={
        "suite": str(ROOT / "evaluators/zoo"), "tasks": ["zoo_rev"],
        "objectives": [{"name": "m", "metric": "char_accuracy"}]}))
    recipe = Recipe.from_dict({"method": "task_arithmetic", "base": str(zoo.base),
                               "models": [{"model": str(zoo.experts["rev"]),
                                           "parameters": {"weight": 0.5}}]})
    result = worker.evaluate(Candidate(id=0, genome=None, kind=PROBE, recipe=recipe))
    assert not result.ok and "meta" in result.reason
    assert probes.get_probe(PROBE).__name__ == "gradient_cosines"
