"""Process start-up (`jax.distributed`), preemption, and Ctrl-C in a run of several processes.

Order of precedence: explicit `distributed.*` config (coordinator address, process count and id),
then JAX's cluster auto-detection (Cloud TPU VM / GKE TPU, SLURM, Open MPI, Kubernetes). A run
with neither is a single process and starts no coordination service.

Preemption: TPU VMs, GKE and SLURM all send SIGTERM before they evict a host. With several
processes, JAX's preemption sync manager spreads the notice to every process and names one step
at which all of them stop; on a single process a SIGTERM handler does the same job. Ctrl-C
(SIGINT) on one process of several becomes that process's SIGTERM, so all of them stop together;
a single process keeps Python's KeyboardInterrupt.
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
    """Name of the cluster of several processes that JAX would auto-detect here, or None."""
    # JAX has no public way to ask, before jax.distributed.initialize() commits to a cluster,
    # whether one is present and how many processes it has. Calling initialize() to find out is
    # wrong for a cluster of one: it starts a coordination service, and on SLURM it hides every GPU
    # but SLURM_LOCALID's from a single task meant to drive them all. So this asks the registry of
    # cluster environments that initialize() itself consults, in its order; the tests in
    # tests/test_cli.py fail if JAX changes it.
    from jax._src.clusters import ClusterEnv

    for cluster in ClusterEnv._cluster_types:
        if cluster.opt_in_only_method:
            continue
        try:
            if not cluster.is_env_present():
                continue
            # initialize() takes the first environment present, so no later one is asked.
            return (cluster.name or cluster.__name__) if cluster.get_process_count() > 1 else None
        except Exception:  # a half-set environment (a Kubernetes pod outside a Job) is not a cluster
            continue
    return None


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
    _stop_all_processes_on_ctrl_c()


# Set by the first Ctrl-C in a run of several processes; PreemptionWatch.reached then starts a
# preemption of them all.
_interrupted = threading.Event()


def _stop_all_processes_on_ctrl_c() -> None:
    """Make Ctrl-C on this process stop every process of the run, as a preemption does.

    Python's KeyboardInterrupt would end this process alone, and the others would wait for it in
    their next collective until jax.distributed's shutdown barrier gives up, five minutes later.
    Instead the first SIGINT asks the loop to preempt every process at its next step. A second
    kills this process, and the coordination service stops the others when its heartbeat stops.
    """
    # A SIGINT that the process's starter ignores (launch/local.sh's background jobs, whose Ctrl-C
    # the script passes on as SIGTERM) or handles itself stays as it is.
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return

    def on_sigint(signum, frame) -> None:
        _interrupted.set()
        # The default action, unlike a Python handler, needs nothing of the main thread, so the
        # next Ctrl-C works at once even while XLA holds it (compiling, or stuck in a collective).
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        log.warning(
            "SIGINT: stopping all %d processes at the next step they agree on, after saving a "
            "checkpoint; Ctrl-C again to stop this one at once",
            jax.process_count(),
        )

    signal.signal(signal.SIGINT, on_sigint)


class PreemptionWatch:
    """Tells the loop when to save and stop: at the same step on every process."""

    def __init__(self, grace_s: float):
        """Watch from now on (a SIGTERM that comes during compilation stops the run after its
        first step). grace_s: how long the preemption save may take; the loop holds it to that."""
        self.grace_s = grace_s
        self._signalled = threading.Event()
        self._multi_process = jax.process_count() > 1
        self._previous_handler = None
        self._interrupt_raised = False
        if not self._multi_process and threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        log.warning("SIGTERM received: will save a checkpoint after this step and stop")
        self._signalled.set()

    def reached(self, step: int) -> bool:
        """True at the agreed stop step. Call it after every step, with the step just finished."""
        if self._multi_process:
            from jax.experimental import multihost_utils

            reached = multihost_utils.reached_preemption_sync_point(step)
            if _interrupted.is_set() and not self._interrupt_raised:
                # Ctrl-C becomes this process's SIGTERM, which JAX's preemption sync manager
                # spreads to every process. Raised here, once JAX has heard of this step: JAX
                # agrees on the step after the furthest one any process has told it of, and before
                # the loop's first call that is step 1, which a resumed run never reaches.
                self._interrupt_raised = True
                signal.raise_signal(signal.SIGTERM)
            return reached
        return self._signalled.is_set()

    def close(self) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
