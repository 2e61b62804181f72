"""Joining a multi-process run: from explicit flags, or from a cluster's environment."""

from __future__ import annotations

import os

import jax


def _cluster_says_multiprocess() -> bool:
    """Environments in which jax.distributed.initialize() finds the coordinator by itself."""
    env = os.environ
    return bool(env.get("JAX_COORDINATOR_ADDRESS")) or any(
        int(env.get(k, "1") or "1") > 1 for k in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"))


def initialize(coordinator: str | None, num_processes: int | None, process_id: int | None) -> None:
    """Start jax.distributed when asked to (flags) or when a cluster says so (environment).

    On CPU the collectives go through gloo, which is what lets several local processes (or hosts
    without accelerators) run one program.
    """
    explicit = bool(num_processes and num_processes > 1)
    if not (explicit or _cluster_says_multiprocess()):
        return
    if os.environ.get("JAX_PLATFORMS", "") in ("", "cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(coordinator, num_processes, process_id)
    else:
        jax.distributed.initialize()
