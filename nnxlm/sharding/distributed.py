"""Multi-host start-up: joins the processes of one run through jax.distributed.

Every process runs the same `nnxlm train` command; JAX's coordination service (on process 0)
connects them, and XLA's collectives move the data. Where the processes come from:

- the command line: --coordinator HOST:PORT --num_processes N --process_id I;
- the environment: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID (any flag given wins);
- a cluster JAX detects from its environment (a SLURM job or Open MPI launch of several tasks),
  with no flags at all.
Otherwise the run is one process.
"""

import os

import jax

from nnxlm.errors import UserError

# A process that sends no heartbeat for this long is declared dead and the others stop with an
# error (JAX's default, 100 s, leaves survivors waiting in a collective for minutes).
HEARTBEAT_TIMEOUT_S = 30
# How long process 0 waits for the others to connect at start-up.
STARTUP_TIMEOUT_S = 300


def _cluster_tasks() -> int:
    """Tasks of a SLURM or Open MPI launch this process belongs to (1 when there is none)."""
    for variable in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if os.environ.get(variable, "").isdigit():
            return int(os.environ[variable])
    return 1


def _integer(value, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{name} is {value!r}: give an integer") from None


def initialize(coordinator: str | None = None, num_processes=None, process_id=None) -> bool:
    """Joins a multi-process run if one is asked for (see the module doc); True if it did."""
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    num_processes = _integer(
        num_processes if num_processes is not None else os.environ.get("JAX_NUM_PROCESSES"), "num_processes"
    )
    process_id = _integer(process_id if process_id is not None else os.environ.get("JAX_PROCESS_ID"), "process_id")
    given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
    if all(value is None for value in given.values()):
        if _cluster_tasks() <= 1:
            return False
        jax.distributed.initialize(heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S)  # JAX reads the cluster
        return True
    missing = [name for name, value in given.items() if value is None]
    if missing:
        raise UserError(
            f"a multi-process run needs --coordinator, --num_processes and --process_id (or JAX_COORDINATOR_ADDRESS, "
            f"JAX_NUM_PROCESSES, JAX_PROCESS_ID); missing: {', '.join(missing)}"
        )
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise UserError(f"process_id {process_id} must be in [0, num_processes={num_processes})")
    if ":" not in coordinator:
        raise UserError(f"coordinator {coordinator!r} must be HOST:PORT, e.g. 10.0.0.1:8476")
    jax.distributed.initialize(
        coordinator,
        num_processes,
        process_id,
        initialization_timeout=STARTUP_TIMEOUT_S,
        heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S,
    )
    return True
