"""Multi-host serving: one engine whose tensor-parallel mesh spans the devices of several processes.

Every process (one per host) runs the same command with the standard `jax.distributed` variables:

    JAX_COORDINATOR_ADDRESS=host0:8476 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=<0 or 1> \\
        python -m fastgen_jax.serve --tensor_parallel=16 ...

`initialize_from_env()` then calls `jax.distributed.initialize`, after which `jax.devices()` lists the
devices of all processes and one `Mesh` covers them. Only process 0, the leader, runs the HTTP server,
the scheduler and the step planner. The step program is SPMD across processes, so every process must
launch it with the same inputs: before each step the leader broadcasts a header i32[3] (op, token
bucket T, page-table width W) and then the step's `StepPlan` itself, as one pytree. The plan's shapes
follow from (T, W) alone, so a follower builds a padding plan of that shape as the receiving
template, launches the same compiled program on its devices and drops the outputs (they are
replicated; the leader reads its own copy). When the leader shuts down it broadcasts a stop header
and the followers exit. The broadcasts are JAX collectives (`multihost_utils.broadcast_one_to_all`), so
the plan travels the same interconnect as the model's all-reduces; no other transport is involved.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import jax
import numpy as np

from fastgen_jax.models.metadata import StepPlan

log = logging.getLogger(__name__)

_STOP, _STEP = 0, 1


_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def launch_from_env() -> tuple[str, int, int] | None:
    """(coordinator address, number of processes, this process's id) from the environment, None
    when none of the variables is set; a ValueError naming what is missing or malformed."""
    values = [os.environ.get(n) for n in _ENV]
    if not any(values):
        return None
    if not all(values):
        missing = [n for n, v in zip(_ENV, values, strict=True) if not v]
        raise ValueError(f"a multi-host launch needs {', '.join(_ENV)}; missing {', '.join(missing)}")
    numbers = []
    for name, value in zip(_ENV[1:], values[1:], strict=True):
        try:
            numbers.append(int(value))
        except ValueError:
            raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if not 0 <= numbers[1] < numbers[0]:
        raise ValueError(f"JAX_PROCESS_ID={numbers[1]} must lie in [0, JAX_NUM_PROCESSES={numbers[0]})")
    return values[0], numbers[0], numbers[1]


def initialize_from_env() -> bool:
    """Joins the process group when `launch_from_env()` finds a launch; True if it did. Must run
    before anything touches a JAX backend."""
    launch = launch_from_env()
    if launch is None:
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes talk over gloo
    jax.distributed.initialize(*launch)
    log.info("process %d of %d; devices: %s", jax.process_index(), jax.process_count(), jax.devices())
    return True


def is_multiprocess() -> bool:
    return jax.process_count() > 1


def is_leader() -> bool:
    return jax.process_index() == 0


def _broadcast(tree):
    """Process 0's `tree` on every process (others pass a template of the same shapes and dtypes)."""
    from jax.experimental import multihost_utils

    received = multihost_utils.broadcast_one_to_all(tree)
    return jax.tree.map(
        lambda r, t: np.asarray(r, np.asarray(t).dtype), received, tree
    )  # bools come back as ints


def _header(op: int, plan: StepPlan | None) -> np.ndarray:
    bucket, width = (0, 0) if plan is None else plan.shape
    return np.asarray([op, bucket, width], np.int32)


def send_plan(plan: StepPlan) -> None:
    """Leader: hands this step's plan to every follower (call right before launching the step)."""
    _broadcast(_header(_STEP, plan))
    _broadcast(plan)


def send_stop() -> None:
    """Leader: tells the followers to return from `follow`."""
    _broadcast(_header(_STOP, None))


def follow(padding: Callable[[int, int], StepPlan], execute: Callable[[StepPlan], object]) -> int:
    """Follower: runs the leader's steps until it stops; returns how many it ran.

    `padding(T, W)` gives a plan of a step's shapes; `execute(plan)` launches the step program."""
    steps = 0
    while True:
        op, bucket, width = (int(x) for x in _broadcast(_header(_STOP, None)))
        if op == _STOP:
            return steps
        execute(_broadcast(padding(bucket, width)))
        steps += 1


def warm_broadcasts(plans: list[StepPlan]) -> None:
    """Every process, in the same order: runs each plan shape's broadcast once, so that serving
    compiles nothing, not even the broadcasts. (On a follower `send_plan` receives the leader's.)"""
    for plan in plans:
        send_plan(plan)
