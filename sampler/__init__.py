"""repa sampler: reference-exact ODE/SDE solvers, distributed generation (repa-sample) and scoring (repa-eval).

``from sampler import euler_sampler, euler_maruyama_sampler`` gives the solvers with REPA's signatures.
"""
from .solvers import euler_maruyama_sampler, euler_sampler

__all__ = ["euler_sampler", "euler_maruyama_sampler"]
