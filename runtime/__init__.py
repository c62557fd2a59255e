"""eqr.runtime: the convergence-gated inference loop, its backends, `Solver` and `Scheduler`."""
from eqr.runtime.config import SolveConfig
from eqr.runtime.loop import solve
from eqr.runtime.solver import Solver, SolveResult
from eqr.runtime.stats import SolveStats

__all__ = ["Solver", "SolveResult", "SolveConfig", "SolveStats", "Scheduler", "solve"]


def __getattr__(name: str):  # Scheduler pulls in threading machinery; load it on first use
    if name == "Scheduler":
        from eqr.runtime.scheduler import Scheduler

        return Scheduler
    raise AttributeError(name)
