"""Process start-up (`jax.distributed`) and preemption.

Order of precedence: explicit `distributed.*` config (coordinator address, process count and id),
then JAX's cluster auto-detection (Cloud TPU VM / GKE TPU, SLURM, Open MPI, Kubernetes). A run
with neither is a single process and starts no coordination service.

Preemption: TPU VMs, GKE and SLURM all send SIGTERM before they evict a host. With several
processes, JAX's preemption sync manager spreads the notice to every process and names one step
at which all of them stop; on a single process a SIGTERM handler does the same job.
"""

from __future__ import annotations

import logging
import signal
import threading

import jax

from jaxlm.config import DistributedConfig
from jaxlm.errors import ConfigError

log = logging.getLogger("jaxlm")


def detected_cluster() -> str | None:
    """Name of the cluster environment JAX would auto-detect here, or None."""
    try:
        from jax._src.clusters import ClusterEnv
    except ImportError:  # a JAX without the registry: fall back to asking JAX itself at start-up
        return None
    for cluster in ClusterEnv._cluster_types:
        if getattr(cluster, "opt_in_only_method", False):
            continue
        try:
            if cluster.is_env_present() and cluster.get_process_count() > 1:
                return getattr(cluster, "name", cluster.__name__)
        except Exception:  # a half-set environment is not a cluster
            continue
    return None


def is_multi_process(config: DistributedConfig) -> bool:
    """Whether this run will span several processes (explicit config or a detected cluster)."""
    if config.num_processes is not None:
        return config.num_processes > 1
    return config.auto_detect and detected_cluster() is not None


def initialize(config: DistributedConfig) -> None:
    """Start `jax.distributed` when this run spans several processes; otherwise do nothing."""
    explicit = [config.coordinator_address, config.num_processes, config.process_id]
    if any(value is not None for value in explicit):
        if any(value is None for value in explicit):
            raise ConfigError(
                "distributed.coordinator_address, distributed.num_processes and distributed.process_id "
                "must be set together (or none of them, for cluster auto-detection)"
            )
        if not 0 <= config.process_id < config.num_processes:
            raise ConfigError(
                f"distributed.process_id={config.process_id} must be in [0, {config.num_processes})"
            )
        if config.num_processes == 1:
            return
        kwargs = {
            "coordinator_address": config.coordinator_address,
            "num_processes": config.num_processes,
            "process_id": config.process_id,
        }
        source = "config"
    else:
        cluster = detected_cluster() if config.auto_detect else None
        if cluster is None:
            return
        kwargs, source = {}, f"{cluster} auto-detection"
    # Collectives between CPU devices of different processes (tests, laptops); no effect on TPU/GPU.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if config.local_device_ids is not None:
        kwargs["local_device_ids"] = config.local_device_ids
    jax.distributed.initialize(
        **kwargs,
        initialization_timeout=config.initialization_timeout_s,
        heartbeat_timeout_seconds=config.heartbeat_timeout_s,
    )
    log.info(
        "jax.distributed up from %s: process %d of %d, %d local / %d global devices",
        source,
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


class PreemptionWatch:
    """Tells the loop when to save and stop: at the same step on every process."""

    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self._signalled = threading.Event()
        self._multi_process = jax.process_count() > 1
        self._previous_handler = None
        if not self._multi_process and threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        log.warning("SIGTERM received: will save a checkpoint after this step and stop")
        self._signalled.set()

    def reached(self, step: int) -> bool:
        """True at the agreed stop step. Call it after every step, with the step just finished."""
        if self._multi_process:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self._signalled.is_set()

    def start_grace_timer(self) -> threading.Timer:
        """Abort the process if saving outlives the grace period (the host is about to vanish)."""

        def expire() -> None:
            log.error(
                "preemption checkpoint not finished within distributed.preemption_grace_s=%.0fs; "
                "exiting (the previous complete checkpoint is kept)",
                self.grace_s,
            )
            import os

            os._exit(1)

        timer = threading.Timer(self.grace_s, expire)
        timer.daemon = True
        timer.start()
        return timer

    def close(self) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
