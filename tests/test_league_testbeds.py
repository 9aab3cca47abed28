"""The league's zoo testbed, checked without running it: tests/test_league.py runs the quick
league on digits, digits-mo and hard only, so here every registered strategy is shown to
start on the zoo with the options and overrides benchmarks/strategies.py gives it there."""

from __future__ import annotations

import json

from helpers import load_script

from mergesearch.strategies import strategies


def test_every_strategy_can_run_the_zoo_testbed_with_its_overrides(zoo, tmp_path,
                                                                    monkeypatch) -> None:
    league = load_script("benchmarks/strategies.py", "league", monkeypatch)
    assert "zoo" in league.parse_args([]).testbeds.split(",")  # run by default
    bench = league.Bench(league.TESTBEDS["zoo"], tmp_path)
    assert bench.uniform.method == "task_arithmetic" and len(bench.problem.dims) == 8
    overridden = []
    for s in strategies():
        options = league.options_for(s, "zoo")
        assert bench.cannot_run(s, options) is None, s
        exp = bench.experiment(s, options, seed=1, evaluations=12)
        assert (exp.strategy.name, exp.seed, exp.budget.evaluations) == (s, 1, 12)
        assert exp.strategy.options == json.loads(json.dumps(options))
        if bench.extra(s):  # its own space, not the testbed's
            assert exp.space != bench.search.exp.space, s
            overridden.append(s)
    assert {"merge_moea", "map", "bayesian_map", "bmm"} <= set(overridden)
