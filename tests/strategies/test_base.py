"""The strategy interface itself: problems, scalarisation, the registry."""

from __future__ import annotations

import pytest

from mergesearch.strategies import (
    Dimension,
    Objective,
    Problem,
    StrategyError,
    create_strategy,
    get_strategy,
    register,
    strategies,
)


def test_dimension_checks_bounds_and_init() -> None:
    with pytest.raises(StrategyError, match="'w'.*must be <"):
        Dimension("w", 1.0, 1.0, 1.0)
    with pytest.raises(StrategyError, match="'w'.*outside"):
        Dimension("w", 0.0, 1.0, 2.0)


def test_problem_needs_unique_names() -> None:
    with pytest.raises(StrategyError, match="dimension name.*'w'"):
        Problem((Dimension("w", 0, 1, 0), Dimension("w", 0, 2, 0)), (Objective("a"),))
    with pytest.raises(StrategyError, match="objective name.*'a'"):
        Problem((Dimension("w", 0, 1, 0),), (Objective("a"), Objective("a", "minimize")))
    with pytest.raises(StrategyError, match="at least one objective"):
        Problem((Dimension("w", 0, 1, 0),), ())


def test_losses_and_weighted_scalarisation() -> None:
    p = Problem((Dimension("w", 0, 1, 0),),
                (Objective("acc", "maximize", weight=3.0), Objective("size", "minimize")))
    assert list(p.losses({"acc": 0.5, "size": 2.0})) == [-0.5, 2.0]
    assert p.scalar_loss({"acc": 0.5, "size": 2.0}) == pytest.approx((3 * -0.5 + 2.0) / 4)


def test_registry() -> None:
    assert {"random", "cmaes", "tpe", "nsga2"} <= set(strategies())
    with pytest.raises(StrategyError, match="unknown strategy 'nope'; available: .*cmaes"):
        get_strategy("nope")
    with pytest.raises(ValueError, match="already registered"):
        register(type("Impostor", (get_strategy("random"),), {}))
    p = Problem((Dimension("w", 0, 1, 0.5),), (Objective("a"),))
    assert create_strategy("random", p, seed=3).seed == 3


def test_a_strategy_asking_too_much_is_a_bug() -> None:
    cls = get_strategy("random")
    greedy = type("Greedy", (cls,), {"_ask": lambda self, n: [([0.5], 1.0)] * (n + 1)})
    p = Problem((Dimension("w", 0, 1, 0.5),), (Objective("a"),))
    with pytest.raises(AssertionError, match="returned 3 candidates for ask\\(2\\)"):
        greedy(p).ask(2)
