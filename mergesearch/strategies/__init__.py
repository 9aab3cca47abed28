"""Search strategies behind one ask/tell interface, registered by name."""

from .base import (
    Dimension,
    Objective,
    Problem,
    Proposal,
    Strategy,
    StrategyError,
    StrategyOptions,
    create_strategy,
    get_strategy,
    register,
    strategies,
)
from .bmm import BMM
from .cmaes import CMAES
from .evo_merging import EvoMerging
from .frank_wolfe import FrankWolfe
from .m2n2 import M2N2
from .map import BayesianMap, Map, NestedMap
from .merge_moea import MergeMOEA
from .mm_mo import MMMO
from .multi_fidelity import SuccessiveHalving
from .optuna_samplers import NSGA2, TPE
from .pymoo_strategy import Pymoo
from .random_search import RandomSearch
from .sakana import SakanaDFS, SakanaPS

__all__ = [
    "BMM",
    "CMAES",
    "EvoMerging",
    "FrankWolfe",
    "M2N2",
    "BayesianMap",
    "Map",
    "NestedMap",
    "MergeMOEA",
    "MMMO",
    "NSGA2",
    "TPE",
    "Pymoo",
    "RandomSearch",
    "SakanaDFS",
    "SakanaPS",
    "SuccessiveHalving",
    "Dimension",
    "Objective",
    "Problem",
    "Proposal",
    "Strategy",
    "StrategyError",
    "StrategyOptions",
    "create_strategy",
    "get_strategy",
    "register",
    "strategies",
]
