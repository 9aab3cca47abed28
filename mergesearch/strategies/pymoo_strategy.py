"""Any pymoo algorithm (Blank & Deb 2020, pymoo 0.6) by name, through its ask/tell interface.

``{name: pymoo, options: {algorithm: nsga2, options: {pop_size: 20}}}`` runs pymoo's NSGA-II;
every key under ``options`` is a keyword of the pymoo algorithm's constructor, checked against
its signature before anything runs.  Algorithms by name, what each one minimises and the
variable kinds it searches:

============  ================  =====================================================
name          sees              variable kinds
============  ================  =====================================================
ga            weighted sum      real, int, binary, categorical (mixed-variable GA)
de, pso, es   weighted sum      real
cmaes         weighted sum      real (pymoo's CMAES around pycma)
nsga2         losses vector     real, int, binary, categorical (mixed-variable)
smsemoa       losses vector     real, int, binary, categorical (mixed-variable)
spea2         losses vector     real, int, binary, categorical (mixed-variable)
nsga3, unsga3 losses vector     real, int, binary, categorical (mixed-variable)
moead, rvea   losses vector     real
rnsga2        losses vector     real (needs ``ref_points``)
agemoea(2)    losses vector     real (pymoo needs ``numba`` for these)
============  ================  =====================================================

Faithful to pymoo: each algorithm's operators, selection, survival and defaults (except the
population size, below), its reference-direction maths, its termination criteria, and the
mixed-variable operators (``MixedVariableSampling``, ``MixedVariableMating``,
``MixedVariableDuplicateElimination``) for problems with int, binary or categorical
dimensions.  pymoo draws from the ``numpy.random.Generator`` it builds from the seed given to
``Algorithm.setup``.

Our choices:

- A problem with any non-real dimension runs in pymoo's mixed-variable form (``Real``,
  ``Integer``, ``Binary``, ``Choice`` of the category indices), with the mixed operators
  replacing the algorithm's sampling and mating (its selection is kept); algorithms whose
  infill is not a plain mating step (DE, PSO, CMA-ES, MOEA/D, RVEA...) refuse such problems,
  naming those that accept them.
- Single-objective algorithms see :meth:`Problem.scalar_loss`; multi-objective ones see
  :meth:`Problem.losses` (maximised objectives negated), so ``ref_points`` are in losses too.
  The class declares ``multi_objective = True`` (the default, NSGA-II, reports a front); an
  instance running a single-objective algorithm sets ``multi_objective`` False on itself.
- Population size 20 where the algorithm has a ``pop_size`` (pymoo's default is 100, too many
  for merge budgets of a few hundred evaluations); CMA-ES keeps pycma's default.  Algorithms
  with reference directions get Das-Dennis directions, as many as fit in the population size
  (20 unless given: 20 directions for two objectives, 15 for three), unless ``ref_dirs`` is
  given: ``{method: das-dennis, n_partitions: 12}`` (any method of pymoo's
  ``get_reference_directions``) or an explicit list of rows.
- An option value ``{class: pymoo.operators.crossover.sbx.SBX, eta: 15}`` builds that pymoo
  object (only classes under ``pymoo.``); lists of numbers become arrays.
- ``include_init`` (default on): the first member of the initial population is the problem's
  start point (for CMA-ES: the start point is pymoo's ``x0``, the mean's start).
- Generation-based: ``ask(n)`` hands out members of the current pymoo population not yet
  issued, returns ``[]`` until every member is told, then evaluates the population with the
  told losses through pymoo's ``Evaluator`` and calls ``algorithm.tell``.  pymoo's MOEA/D
  asks for one individual at a time, so it keeps only one candidate in flight.
- A failed candidate's losses are, per objective, ``worst + (worst - best) + 1`` over every
  successful loss told so far, so it ranks below every success of its generation.
- No termination by default (the controller's budget decides); ``termination: [n_gen, 50]``
  (pymoo's ``get_termination`` names, not ``time``, which would make replay depend on the
  clock) gives one, and ``done`` turns True when it fires, or when pymoo can propose nothing
  (CMA-ES converged, mating found no new offspring).
- Randomness: pymoo is set up with a seed derived from ours.  pymoo's CMA-ES hands its seed
  to pycma, which reseeds and draws from the global ``np.random``; so every pymoo call runs with
  a private global numpy state swapped in and the user's state restored after, which keeps the
  user's generator untouched and the replay exact.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import Field, field_validator, model_validator

from mergesearch.strategies.base import (
    Dimension,
    Strategy,
    StrategyError,
    StrategyOptions,
    register,
)
from mergesearch.trial import Candidate, Result


@dataclass(frozen=True)
class _Algorithm:
    path: str  # module:Class
    multi: bool  # sees the losses vector (else the weighted sum)
    mixed: bool = False  # searches int, binary, categorical through pymoo's mixed operators
    ref_dirs: bool = False  # takes reference directions
    needs: tuple[str, ...] = ()  # options pymoo requires
    requires: str | None = None  # an extra package pymoo imports for it
    also: tuple[str, ...] = ()  # classes (module:Class) the constructor hands keywords to


_SOO, _MOO = "pymoo.algorithms.soo.nonconvex", "pymoo.algorithms.moo"
ALGORITHMS: dict[str, _Algorithm] = {
    "ga": _Algorithm(f"{_SOO}.ga:GA", False, mixed=True),
    "de": _Algorithm(f"{_SOO}.de:DE", False, also=(f"{_SOO}.de:Variant",)),  # F, CR, ...
    "pso": _Algorithm(f"{_SOO}.pso:PSO", False),
    "es": _Algorithm(f"{_SOO}.es:ES", False),
    "cmaes": _Algorithm(f"{_SOO}.cmaes:CMAES", False),
    "nsga2": _Algorithm(f"{_MOO}.nsga2:NSGA2", True, mixed=True),
    "smsemoa": _Algorithm(f"{_MOO}.sms:SMSEMOA", True, mixed=True),
    "spea2": _Algorithm(f"{_MOO}.spea2:SPEA2", True, mixed=True),
    "nsga3": _Algorithm(f"{_MOO}.nsga3:NSGA3", True, mixed=True, ref_dirs=True),
    "unsga3": _Algorithm(f"{_MOO}.unsga3:UNSGA3", True, mixed=True, ref_dirs=True),
    "moead": _Algorithm(f"{_MOO}.moead:MOEAD", True, ref_dirs=True),
    "rvea": _Algorithm(f"{_MOO}.rvea:RVEA", True, ref_dirs=True),
    "rnsga2": _Algorithm(f"{_MOO}.rnsga2:RNSGA2", True, needs=("ref_points",)),
    "agemoea": _Algorithm(f"{_MOO}.age:AGEMOEA", True, requires="numba"),
    "agemoea2": _Algorithm(f"{_MOO}.age2:AGEMOEA2", True, requires="numba"),
}

#: constructor keywords this adapter sets itself
_MANAGED = frozenset({"seed", "termination", "verbose", "output", "display", "callback",
                      "evaluator", "save_history", "archive", "x0", "cmaes_verbose", "verb_log"})
#: keywords the mixed-variable operators replace on problems with non-real dimensions
_MIXED_REPLACES = frozenset({"sampling", "crossover", "mutation", "mating",
                             "eliminate_duplicates", "repair"})
#: pymoo terminations whose decision depends only on what the algorithm was told
_TERMINATIONS = ("n_eval", "n_evals", "n_gen", "n_iter", "fmin", "soo", "moo")
DEFAULT_POP_SIZE = 20
#: algorithms that size their population themselves (pycma's default; one per direction)
_OWN_POP_SIZE = ("cmaes", "moead")


def _algorithm_class(name: str, path: str | None = None) -> type:
    spec = ALGORITHMS[name]
    module, _, attr = (path or spec.path).partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except ImportError as err:
        raise ValueError(f"pymoo's {name} cannot be imported ({err}); "
                         + (f"install {spec.requires}" if spec.requires else "check pymoo")
                         ) from None
    except Exception as err:  # pymoo raises a bare Exception when numba is missing
        raise ValueError(f"pymoo's {name} cannot be imported: {err}") from None


def _keywords(cls: type) -> set[str]:
    """The constructor keywords of a pymoo algorithm, following ``**kwargs`` up its bases."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or klass is object:
            continue
        params = inspect.signature(klass.__init__).parameters.values()
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    names.discard("self")
    return names


class PymooOptions(StrategyOptions):
    algorithm: str = "nsga2"
    """A pymoo algorithm by name (see the module's table)."""
    options: dict[str, Any] = Field(default_factory=dict)
    """Keywords of the algorithm's constructor (``pop_size``, ``ref_dirs``, pycma options
    for ``cmaes``...)."""
    termination: list[Any] | None = None
    """A pymoo termination as ``[name, *args]`` (``[n_gen, 50]``, ``[n_eval, 400]``); None:
    the controller's budget decides."""
    include_init: bool = True
    """Make the problem's start point the first member of the initial population."""

    @field_validator("algorithm")
    @classmethod
    def _known_algorithm(cls, value: str) -> str:
        name = value.lower().replace("-", "").replace("_", "")
        if name not in ALGORITHMS:
            raise ValueError(f"unknown pymoo algorithm {value!r} (known: "
                             f"{', '.join(ALGORITHMS)})")
        return name

    @field_validator("termination")
    @classmethod
    def _known_termination(cls, value: list[Any] | None) -> list[Any] | None:
        if value is not None and (not value or value[0] not in _TERMINATIONS):
            raise ValueError(f"termination {value!r}: give [name, *args] with a name among "
                             f"{', '.join(_TERMINATIONS)}")
        return value

    @model_validator(mode="after")
    def _known_keywords(self) -> PymooOptions:
        cls = _algorithm_class(self.algorithm)
        known = _keywords(cls) - _MANAGED
        for path in ALGORITHMS[self.algorithm].also:
            known |= _keywords(_algorithm_class(self.algorithm, path)) - _MANAGED
        if self.algorithm == "cmaes":  # pymoo passes further keywords on to pycma
            import cma

            known |= set(cma.CMAOptions.defaults()) - {"seed", "bounds", "verbose"}
        if self.algorithm == "moead":  # one member per reference direction
            known.discard("pop_size")
        for key in self.options:
            if key in _MANAGED:
                raise ValueError(f"options.{key}: set by mergesearch (use the strategy's own "
                                 "options: termination, include_init; the seed is the search's)")
            if key not in known:
                raise ValueError(f"options.{key}: not a keyword of pymoo's {cls.__name__} "
                                 f"(known: {', '.join(sorted(known))})")
        return self


@register
class Pymoo(Strategy):
    """A pymoo algorithm by name, one generation (pymoo ``ask``) at a time."""

    name = "pymoo"
    description = ("Any pymoo algorithm by name (GA, DE, CMA-ES, NSGA-II/III, MOEA/D, SMS-EMOA"
                   "...), generation by generation; default NSGA-II")
    multi_objective = True
    rng_libraries = ("pymoo", "numpy", "cma")
    kinds = frozenset({"real", "int", "binary", "categorical"})  # the default, NSGA-II
    Options = PymooOptions
    options: PymooOptions

    # -- building the pymoo side ------------------------------------------------------------

    def _setup(self) -> None:
        spec = ALGORITHMS[self.options.algorithm]
        p = self.problem
        self.multi_objective = spec.multi  # type: ignore[misc]  # what this instance reports
        self._mixed = bool(p.discrete)
        self._check(spec)
        self._n_obj = len(p.objectives) if spec.multi else 1
        # our private global numpy state (pycma draws from np.random), made from the seed
        self._global_state = np.random.RandomState(self.seed).get_state()
        self._worst: np.ndarray | None = None  # per objective, over successful losses
        self._best: np.ndarray | None = None
        self._done = False
        with self._private_random():
            self._pymoo_problem = self._build_problem()
            self._algorithm = self._build_algorithm(spec)
            termination = None
            if self.options.termination is not None:
                from pymoo.termination import get_termination

                termination = get_termination(*self.options.termination)
            else:
                from pymoo.core.termination import NoTermination

                termination = NoTermination()
            seed = int(np.random.SeedSequence(self.seed).generate_state(1)[0] % (2**31 - 1)) + 1
            try:
                self._algorithm.setup(self._pymoo_problem, seed=seed, termination=termination)
            except Exception as err:  # pymoo refuses a setting: say so in our terms
                raise StrategyError(f"pymoo's {self.options.algorithm} cannot be set up with "
                                    f"options {self.options.options}: {err}") from None
        self._sample()

    def _check(self, spec: _Algorithm) -> None:
        name, p = self.options.algorithm, self.problem
        if self._mixed and not spec.mixed:
            able = ", ".join(n for n, s in ALGORITHMS.items() if s.mixed)
            kinds = sorted({d.kind for d in p.discrete})
            raise StrategyError(
                f"pymoo's {name} searches real variables only, but dimension "
                f"{p.discrete[0].name!r} is {p.discrete[0].kind} ({', '.join(kinds)} here): "
                f"use algorithm {able} of the pymoo strategy, or the random, tpe or nsga2 "
                "strategies, which handle every type")
        if self._mixed:
            clash = sorted(_MIXED_REPLACES & set(self.options.options))
            if clash:
                raise StrategyError(
                    f"pymoo's {name}: options {', '.join(clash)} apply to real-only problems; "
                    "with int, binary or categorical dimensions pymoo's mixed-variable "
                    "operators are used")
        if (spec.ref_dirs or spec.needs) and len(p.objectives) < 2:
            raise StrategyError(f"pymoo's {name} needs two or more objectives; for one, use "
                                "algorithm ga, de, cmaes or nsga2")
        missing = [k for k in spec.needs if k not in self.options.options]
        if missing:
            raise StrategyError(f"pymoo's {name} needs option(s) {', '.join(missing)} "
                                "(reference points in losses: maximised objectives negated)")
        if name == "rvea" and self.options.termination is None:
            raise StrategyError("pymoo's rvea adapts its reference directions over a fixed "
                                "number of generations: give termination: [n_gen, N] or "
                                "[n_eval, N]")

    def _build_problem(self) -> Any:
        from pymoo.core.problem import Problem as PymooProblem

        p, n_obj = self.problem, self._n_obj

        class Told(PymooProblem):
            """Evaluates nothing: hands back the losses the search told (set before eval)."""

            told: np.ndarray

            def _evaluate(self, x: Any, out: dict[str, Any], *args: Any, **kwargs: Any) -> None:
                out["F"] = self.told

        if not self._mixed:
            return Told(n_var=p.n_dims, n_obj=n_obj, xl=p.low, xu=p.high)
        return Told(vars=pymoo_variables(p.dims), n_obj=n_obj)

    def _build_algorithm(self, spec: _Algorithm) -> Any:
        cls = _algorithm_class(self.options.algorithm)
        keywords = _keywords(cls)
        kwargs = {k: _value(v) for k, v in self.options.options.items() if k != "ref_dirs"}
        if "pop_size" in keywords and self.options.algorithm not in _OWN_POP_SIZE:
            kwargs.setdefault("pop_size", DEFAULT_POP_SIZE)
        if spec.ref_dirs:
            kwargs["ref_dirs"] = self._ref_dirs(kwargs.get("pop_size", DEFAULT_POP_SIZE))
            if self.options.algorithm != "moead" and "pop_size" not in self.options.options:
                kwargs["pop_size"] = len(kwargs["ref_dirs"])
        if self.options.algorithm == "cmaes" and self.options.include_init:
            kwargs["x0"] = self.problem.x0
        if self._mixed:
            kwargs.update(self._mixed_operators(cls, kwargs.pop("selection", None)))
        try:
            algorithm = cls(**kwargs)
        except Exception as err:
            raise StrategyError(f"pymoo's {self.options.algorithm} refuses options "
                                f"{self.options.options}: {err}") from None
        if self.options.include_init and self.options.algorithm != "cmaes":
            init = getattr(algorithm, "initialization", None)
            if init is None:
                raise StrategyError(f"pymoo's {self.options.algorithm} has no initial "
                                    "population to put the start point in: set include_init "
                                    "false")
            init.sampling = _start_first(init.sampling, self._start())
        return algorithm

    def _ref_dirs(self, pop_size: int) -> np.ndarray:
        from pymoo.util.ref_dirs import get_reference_directions

        m = len(self.problem.objectives)
        given = self.options.options.get("ref_dirs")
        if given is None:  # Das-Dennis: as many directions as fit in the population
            partitions = 1
            while math.comb(partitions + 1 + m - 1, m - 1) <= pop_size:
                partitions += 1
            return get_reference_directions("das-dennis", m, n_partitions=partitions)
        if isinstance(given, dict):
            rest = {k: v for k, v in given.items() if k != "method"}
            try:
                return get_reference_directions(given.get("method", "das-dennis"), m, **rest)
            except Exception as err:
                raise StrategyError(f"pymoo ref_dirs {given}: {err}") from None
        dirs = np.asarray(given, dtype=float)
        if dirs.ndim != 2 or dirs.shape[1] != m:
            raise StrategyError(f"pymoo ref_dirs: give rows of {m} values (one per objective), "
                                f"got shape {dirs.shape}")
        return dirs

    @staticmethod
    def _mixed_operators(cls: type, selection: Any) -> dict[str, Any]:
        from pymoo.core.mixed import (
            MixedVariableDuplicateElimination,
            MixedVariableMating,
            MixedVariableSampling,
        )
        from pymoo.operators.selection.rnd import RandomSelection

        if selection is None:  # keep the algorithm's own selection (tournaments on rank...)
            for klass in cls.__mro__:
                init = vars(klass).get("__init__")
                param = init and inspect.signature(init).parameters.get("selection")
                if param is not None and param.default is not inspect.Parameter.empty:
                    selection = param.default
                    break
        return {"sampling": MixedVariableSampling(),
                "mating": MixedVariableMating(
                    selection=selection or RandomSelection(),
                    eliminate_duplicates=MixedVariableDuplicateElimination()),
                "eliminate_duplicates": MixedVariableDuplicateElimination()}

    def _start(self) -> Any:
        """The problem's start point as pymoo holds a solution."""
        if not self._mixed:
            return self.problem.x0
        return {d.name: (bool(d.init) if d.kind == "binary" else
                         int(d.init) if d.discrete else float(d.init)) for d in self.problem.dims}

    def _genome(self, x: Any) -> list[float]:
        if self._mixed:
            x = [float(x[d.name]) for d in self.problem.dims]
        return self.problem.clip(np.asarray(x, dtype=float))

    @contextmanager
    def _private_random(self) -> Iterator[None]:
        """Run with our own global numpy state (see the module doc), the user's restored."""
        users = np.random.get_state()
        np.random.set_state(self._global_state)
        try:
            yield
        finally:
            self._global_state = np.random.get_state()
            np.random.set_state(users)

    # -- generations ------------------------------------------------------------------------

    @property
    def algorithm(self) -> Any:
        """The pymoo algorithm (read it, do not drive it)."""
        return self._algorithm

    @property
    def generation(self) -> int:
        """pymoo's iteration counter (1 before the first tell)."""
        return int(self._algorithm.n_iter or 1)

    @property
    def done(self) -> bool:
        return self._done

    def _sample(self) -> None:
        """Ask pymoo for its next population (skipping members it already knows)."""
        from pymoo.core.individual import Individual
        from pymoo.core.population import Population

        self._infills: Any = None
        self._members: list[int] = []
        self._issued = 0
        self._slot: dict[int, int] = {}  # candidate id -> member index
        self._losses: dict[int, np.ndarray | None] = {}  # member index -> losses; None failed
        with self._private_random():
            infills = self._algorithm.ask() if self._algorithm.has_next() else None
        if infills is None or len(infills if not isinstance(infills, Individual) else [0]) == 0:
            self._done = True
            return
        self._infills = infills
        pop = Population.create(infills) if isinstance(infills, Individual) else infills
        self._members = [i for i, ind in enumerate(pop) if "F" not in ind.evaluated]
        self._genomes = [self._genome(pop[i].X) for i in self._members]
        if not self._members:  # nothing new to score: let pymoo move on
            self._advance()

    def _ask(self, n: int) -> list[tuple[Sequence[float], float]]:
        start = self._issued
        stop = min(len(self._members), start + n)
        out = []
        for k, index in enumerate(range(start, stop)):
            self._slot[self._next_id + k] = index  # the id the base class will give it
            out.append((self._genomes[index], 1.0))
        self._issued = stop
        return out

    def _tell(self, told: list[tuple[Candidate, Result]]) -> None:
        for cand, result in told:
            index = self._slot.pop(cand.id)
            loss = None
            if result.ok:
                p = self.problem
                loss = (p.losses(result.values) if self.multi_objective
                        else np.array([p.scalar_loss(result.values)]))
                self._worst = loss if self._worst is None else np.maximum(self._worst, loss)
                self._best = loss if self._best is None else np.minimum(self._best, loss)
            self._losses[index] = loss
        if len(self._losses) == len(self._members):
            self._advance()

    def _advance(self) -> None:
        """Tell pymoo the whole population's losses, then sample the next one."""
        penalty = (np.zeros(self._n_obj) if self._worst is None
                   else self._worst + (self._worst - self._best) + 1.0)
        F = np.array([penalty if self._losses[i] is None else self._losses[i]
                      for i in range(len(self._members))]).reshape(len(self._members),
                                                                   self._n_obj)
        self._pymoo_problem.told = F
        with self._private_random():
            self._algorithm.evaluator.eval(self._pymoo_problem, self._infills,
                                           algorithm=self._algorithm)
            self._algorithm.tell(infills=self._infills)
        self._sample()


def pymoo_variables(dims: Sequence[Dimension]) -> dict[str, Any]:
    """pymoo's mixed-variable declaration of ``dims``, by name (a categorical's choices as
    their indices, as genomes hold them)."""
    from pymoo.core.variable import Binary, Choice, Integer, Real

    variables: dict[str, Any] = {}
    for d in dims:
        if d.kind == "real":
            variables[d.name] = Real(bounds=(d.low, d.high))
        elif d.kind == "int":
            variables[d.name] = Integer(bounds=(int(d.low), int(d.high)))
        elif d.kind == "binary":
            variables[d.name] = Binary()
        else:
            variables[d.name] = Choice(options=list(range(len(d.choices))))
    return variables


def _value(value: Any) -> Any:
    """An option value as pymoo takes it: ``{class: pymoo..., **kw}`` an object, a list of
    numbers an array."""
    if isinstance(value, dict) and "class" in value:
        path = str(value["class"])
        module, sep, attr = path.replace(":", ".").rpartition(".")
        if not sep or not module.startswith("pymoo."):
            raise StrategyError(f"pymoo option class {path!r}: give a pymoo class by its "
                                "import path (pymoo.operators.crossover.sbx.SBX)")
        try:
            cls = getattr(importlib.import_module(module), attr)
            return cls(**{k: _value(v) for k, v in value.items() if k != "class"})
        except (ImportError, AttributeError, TypeError, ValueError) as err:
            raise StrategyError(f"pymoo option class {path!r}: {err}") from None
    if isinstance(value, list) and value and all(
            isinstance(v, (int, float)) or (isinstance(v, list) and v) for v in value):
        try:
            return np.asarray(value, dtype=float)
        except ValueError:
            return value
    return value


def _start_first(inner: Any, start: Any) -> Any:
    """A pymoo sampling whose first point is ``start``, the rest ``inner``'s."""
    from pymoo.core.population import Population
    from pymoo.core.sampling import Sampling

    class StartFirst(Sampling):
        def do(self, problem: Any, n_samples: int, *args: Any, random_state: Any = None,
               **kwargs: Any) -> Any:
            if isinstance(inner, Population):
                pop = inner
            elif isinstance(inner, np.ndarray):
                pop = Population.new("X", np.atleast_2d(inner))
            else:
                pop = inner.do(problem, n_samples, *args, random_state=random_state, **kwargs)
            xs = [ind.X for ind in pop]
            xs[0] = start
            return Population.new("X", xs if isinstance(start, dict) else np.array(xs))

        def _do(self, problem: Any, n_samples: int, *args: Any, **kwargs: Any) -> Any:
            raise NotImplementedError  # do() is overridden

    return StartFirst()
