"""Multi-host start-up: `jax.distributed.initialize` from flags or the environment.

Every host runs the same command. Which processes form the job, in order of precedence:

1. explicit: `--coordinator HOST:PORT --num-processes N --process-id I` (or the environment variables
   HYLO_COORDINATOR, HYLO_NUM_PROCESSES, HYLO_PROCESS_ID; HYLO_LOCAL_DEVICE_IDS optional, e.g. "0,1");
2. a cluster jax detects by itself (`jax.distributed.initialize()` without arguments): a Cloud TPU
   pod slice (TPU VM metadata), SLURM (SLURM_NTASKS > 1, one task per host or per GPU), Open MPI,
   Kubernetes. Taken when `--distributed on` / HYLO_DISTRIBUTED=1, or automatically under SLURM with
   several tasks and on a multi-host TPU VM (TPU_WORKER_HOSTNAMES lists several hosts);
3. otherwise one process (nothing to initialise).

After it: each process loads only its rows of the global batch (`data.pipeline`), arrays are made
global with `jax.make_array_from_process_local_data`, only process 0 writes logs, YAML and tokenizer
files, and orbax writes checkpoints collectively (every process takes part).
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Mapping

import jax
from orbax.checkpoint import multihost as ocp_multihost

from hylo_jax.errors import ConfigError

log = logging.getLogger(__name__)

MODES = ("auto", "on", "off")


def plan(*, coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
         mode: str = "auto", env: Mapping[str, str] | None = None) -> dict | None:
    """The keyword arguments of `jax.distributed.initialize` for this process, or None (one process).

    Pure (reads `env`, default os.environ), so every rule is testable without starting anything."""
    env = os.environ if env is None else env
    if mode not in MODES:
        raise ConfigError(f"--distributed must be one of {MODES}, got {mode!r}")
    mode = {"1": "on", "0": "off"}.get(env.get("HYLO_DISTRIBUTED", ""), env.get("HYLO_DISTRIBUTED") or mode) \
        if mode == "auto" else mode
    if mode == "off":
        return None
    coordinator = coordinator or env.get("HYLO_COORDINATOR")
    num_processes = num_processes if num_processes is not None else _int(env, "HYLO_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _int(env, "HYLO_PROCESS_ID")
    if coordinator or num_processes is not None or process_id is not None:
        missing = [n for n, v in (("coordinator", coordinator), ("num_processes", num_processes),
                                  ("process_id", process_id)) if v is None]
        if missing:
            raise ConfigError(f"explicit multi-process start needs coordinator, num_processes and process_id; "
                              f"missing {missing} (flags --coordinator/--num-processes/--process-id or "
                              "HYLO_COORDINATOR/HYLO_NUM_PROCESSES/HYLO_PROCESS_ID)")
        if not 0 <= process_id < num_processes:
            raise ConfigError(f"process_id {process_id} outside [0, {num_processes})")
        kw = dict(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
        if env.get("HYLO_LOCAL_DEVICE_IDS"):
            kw["local_device_ids"] = [int(i) for i in env["HYLO_LOCAL_DEVICE_IDS"].split(",")]
        return kw
    if mode == "on":
        return {}  # jax's own cluster detection (TPU pod, SLURM, MPI, k8s)
    if _int(env, "SLURM_NTASKS", 1) > 1 and "SLURM_JOB_ID" in env:
        return {}
    if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        return {}
    return None


def _int(env: Mapping[str, str], key: str, default: int | None = None) -> int | None:
    if not env.get(key):
        return default
    try:
        return int(env[key])
    except ValueError:
        raise ConfigError(f"environment variable {key}={env[key]!r} is not an integer") from None


def initialize(**kwargs) -> bool:
    """Starts the multi-process runtime when `plan(**kwargs)` says so; True if it did."""
    kw = plan(**kwargs)
    if kw is None:
        return False
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":  # CPU processes talk through gloo
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kw)
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
    return True


_rounds = itertools.count()  # numbers the host-side exchanges: their keys in the coordinator's store stay unique


def largest_over_processes(value: int, timeout_s: float = 600.0) -> int:
    """The largest of every process's `value` (each process must call it at the same point): what a host decision
    that picks the compiled program needs, so that all processes run the same one.

    Through the coordinator's key-value store, not a device collective: a collective would queue behind the
    step in flight and stall the host until it ends, so the next batch could not be prepared meanwhile."""
    if jax.process_count() == 1:
        return value
    client = ocp_multihost.get_jax_distributed_client()
    n, me = next(_rounds), jax.process_index()
    client.key_value_set(f"hylo/largest/{n}/{me}", str(int(value)))
    values = [int(client.blocking_key_value_get(f"hylo/largest/{n}/{p}", int(timeout_s * 1000)))
              for p in range(jax.process_count())]
    if n >= 2:  # every process has read round n - 2: it reached round n - 1 only after
        client.key_value_delete(f"hylo/largest/{n - 2}/{me}")
    return max(values)
