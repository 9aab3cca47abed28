"""The multi-fidelity equal-cost table of benchmarks/estimators.py, on made-up curves."""

from __future__ import annotations

from helpers import load_script


def _bench():
    return load_script("benchmarks/estimators.py", "estimators_bench")


def _run(label: str, plain: str, seed: int, reached: list[tuple], final: float) -> dict:
    return {"testbed": "t", "label": label, "plain": plain, "seed": seed,
            "best": {1: reached[0][1], 2: final}, "seconds": reached[-1][0],
            "reached": reached, "wall": reached[-1][3] + 5, "trials": len(reached),
            "full_cost": 10.0, "spent": 20.0,
            "timing": {"0.500": {"merge": [0.1], "evaluate": [1.0], "other": [0.05],
                                 "items": [5.0]},
                       "1.000": {"merge": [0.1], "evaluate": [2.0], "other": [0.05],
                                 "items": [10.0]}}}


def test_first_reach_takes_the_first_value_at_the_target():
    bench = _bench()
    reached = [(1.0, 0.2, 0.5, 3.0), (2.0, 0.4, 1.0, 6.0), (3.0, 0.5, 1.5, 9.0)]
    assert bench.first_reach(reached, 0.4) == (2.0, 1.0, 6.0)
    assert bench.first_reach(reached, 0.6) is None
    assert bench.first_reach([(1.0, 0.4, 1.0)], 0.4) == (1.0, 1.0, None)  # no wall time


def test_the_table_reports_cost_seconds_and_wall_seconds_to_the_plain_best():
    bench = _bench()
    runs = [_run("plain", "plain", s, [(2.0, 0.3, 1.0, 4.0), (4.0, 0.5, 2.0, 8.0)], 0.5)
            for s in (0, 1)]
    runs += [_run("asha", "plain", s, [(1.0, 0.5, 0.5, 2.0 + s), (3.0, 0.6, 2.0, 6.0)], 0.6)
             for s in (0, 1)]
    text = bench.fidelity_markdown({"runs": runs}, (1, 2))
    lines: dict[str, str] = {}  # the first table's row of each strategy
    for line in text.splitlines():
        if line.startswith("|"):
            lines.setdefault(line.split(" | ")[0], line)
    # the plain final best is 0.5: asha got there at 0.5 full evaluations, 1 s, 2 / 3 wall s
    assert "0.5 ± 0.0 / 1 ± 0 / 2 ± 1 (2/2)" in lines["| asha"]
    assert "2.0 ± 0.0 / 4 ± 0 / 8 ± 0 (2/2)" in lines["| plain"]
    assert "| asha | 0.500 | 2 | 5 | 0.100 | 1.000 | 0.050 | 10x |" in text


def test_the_anytime_table_compares_the_arms_at_equal_evaluation_seconds():
    bench = _bench()
    # plain: 0.3 at 2 s, 0.5 at 4 s (mean evaluation seconds 4); asha seed 0 is ahead
    # throughout, seed 1 has no full result until 3 s and is behind at the end
    runs = [_run("plain", "plain", s, [(2.0, 0.3, 1.0, 4.0), (4.0, 0.5, 2.0, 8.0)], 0.5)
            for s in (0, 1)]
    runs += [_run("asha", "plain", 0, [(0.5, 0.4, 0.5, 1.0), (3.5, 0.6, 2.0, 6.0)], 0.6),
             _run("asha", "plain", 1, [(3.0, 0.35, 0.5, 5.0), (4.0, 0.45, 2.0, 6.0)], 0.45)]
    assert bench.best_by(runs[2]["reached"], 1.0) == 0.4
    assert bench.best_by(runs[3]["reached"], 1.0) is None
    text = "\n".join(bench.anytime_markdown(
        {("t", r["label"]): [x for x in runs if x["label"] == r["label"]] for r in runs},
        "t", ["asha", "plain"]))
    rows = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("|")}
    # time points 1, 2, 3, 4 s
    assert rows["| plain"] == "| plain | — (0) | 0.3000 ± 0.0000 (2) | 0.3000 ± 0.0000 (2) " \
        "| 0.5000 ± 0.0000 (2) |"
    assert rows["| asha"] == "| asha | 0.4000 (1) | 0.4000 (1) | 0.3750 ± 0.0354 (2) " \
        "| 0.5250 ± 0.1061 (2) |"
    assert rows["| asha: seeds ahead or level"] == \
        "| asha: seeds ahead or level | 1/2 | 1/2 | 2/2 | 1/2 |"
