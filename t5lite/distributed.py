"""Joining a multi-process JAX run: one process per host (TPU VM worker, GPU node, CPU process).

    initialize_distributed()                                     # TPU pod slice: automatic
    initialize_distributed("10.0.0.2:1234", num_processes=4, process_id=i)   # CPU / GPU clusters

Must run before any JAX computation. Afterwards jax.devices() lists every host's devices,
jax.process_index() says which host this is, and jitted steps span all of them.
"""

from __future__ import annotations

import jax
import numpy as np
from jax._src import hardware_utils  # the TPU-chip probe jax itself uses, without starting a backend
from jax.experimental import multihost_utils

from t5lite.errors import UserError


def initialize_distributed(
    coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None,
) -> None:
    """Starts jax.distributed when this run spans several processes; a no-op for a single one.

    All three arguments given: an explicit cluster (CPU processes talk over gloo, GPUs over NCCL),
    e.g. launch/local.py. None given: on a Cloud TPU VM, jax detects the slice's workers itself;
    elsewhere the run is single-process.
    """
    given = [coordinator_address is not None, num_processes is not None, process_id is not None]
    if any(given) and not all(given):
        raise UserError(
            "--coordinator_address, --num_processes and --process_id go together (got "
            f"coordinator_address={coordinator_address}, num_processes={num_processes}, process_id={process_id})."
        )
    if all(given):
        if not 0 <= process_id < num_processes:
            raise UserError(f"--process_id={process_id} must be in [0, {num_processes}).")
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # cross-process CPU collectives
        jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id)
    elif hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0:
        jax.distributed.initialize()


def agree(value: int) -> int:
    """Process 0's `value` on every process (e.g. which checkpoint to evaluate next, as one host
    lists the directory): SPMD programs run in lockstep only if every process makes the same choice."""
    if jax.process_count() == 1:
        return value
    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))
