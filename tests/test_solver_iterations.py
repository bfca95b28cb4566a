"""The solver-iteration instrument (``launch/solver_iterations.py``) counts what MJX runs."""

from __future__ import annotations

from unittest import mock

import jax
import numpy as np

import envs
from launch.solver_iterations import instrumented_solve, mjx, mjx_solver


def presolve_data(env):
    """Hopper lowered 10 cm, its foot and leg in the floor (3 contacts), moving: the
    forward pass up to the constraint solve."""
    qpos = np.array(env.mj_model.qpos0)
    qpos[1] -= 0.1
    data = env._data0.replace(qpos=qpos, qvel=np.ones(env.mj_model.nv))
    with mock.patch.object(mjx, "solve", lambda m, d: d):
        return jax.jit(env.sim.forward)(data)


def solved(m, d, **caps):
    m = m.replace(opt=m.opt.replace(**caps))
    return np.asarray(jax.jit(lambda d: mjx_solver.solve(m, d).qacc)(d))


def test_counts_are_the_iterations_mjx_runs():
    env = envs.make("Hopper", iterations="xml", ls_iterations="xml")
    m, d = env.mjx_model, presolve_data(env)
    assert int(d._impl.nefc) > 0 and d._impl.efc_J.shape[0] > 0
    out, niter, ls_max = jax.jit(lambda d: instrumented_solve(m, d))(d)
    niter, ls_max = int(niter), int(ls_max)
    qacc = np.asarray(out.qacc)
    np.testing.assert_array_equal(qacc, solved(m, d))  # the copy is MJX's solve
    assert 2 <= niter < 100 and 1 <= ls_max < 50, (niter, ls_max)
    # MJX capped at the counts gives the same answer. (One iteration fewer can too in
    # float32: the last iteration may end in a line search that finds no improvement.)
    np.testing.assert_array_equal(qacc, solved(m, d, iterations=niter, ls_iterations=ls_max))
