#!/usr/bin/env bash
# Run one jaxlm job as N processes on this machine: the way the tests, and a laptop, run
# multi-host. Each process gets DEVICES_PER_PROCESS CPU devices; process 0 hosts the coordinator
# on 127.0.0.1 at a free port. Waits for all of them; exits non-zero if any fails.
#
#   launch/local.sh N CONFIG [key=value ...]
#   DEVICES_PER_PROCESS=2 launch/local.sh 4 configs/tiny.yaml mesh.fsdp=8
#
# Environment: DEVICES_PER_PROCESS (default 4), JAXLM (the command, default `jaxlm`),
# PYTHON (default python3, used to find a free port). SIGTERM or Ctrl-C is passed on to every
# process as SIGTERM, which then saves a checkpoint at a step they agree on and exits with
# status 75 (run the same command to resume).
set -uo pipefail

if [[ $# -lt 2 || ! $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: launch/local.sh N CONFIG [key=value ...]" >&2
  exit 2
fi
num_processes=$1 config=$2
shift 2
devices_per_process=${DEVICES_PER_PROCESS:-4}
read -r -a jaxlm <<<"${JAXLM:-jaxlm}"
port=$("${PYTHON:-python3}" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

pids=()
for ((process = 0; process < num_processes; process++)); do
  XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${devices_per_process}" \
    JAX_PLATFORMS=cpu \
    "${jaxlm[@]}" train "$config" "$@" \
    distributed.coordinator_address="127.0.0.1:${port}" \
    distributed.num_processes="$num_processes" \
    distributed.process_id="$process" &
  pids+=($!)
done

forward() { kill -"$1" "${pids[@]}" 2>/dev/null; }
trap 'forward TERM' TERM
# Background processes of a script ignore SIGINT, so Ctrl-C goes on as the preemption signal.
trap 'forward TERM' INT

status=0
for process in "${!pids[@]}"; do
  while true; do
    wait "${pids[$process]}"
    code=$?
    # A trapped signal interrupts `wait` with a status above 128 while the child still runs.
    if ((code > 128)) && kill -0 "${pids[$process]}" 2>/dev/null; then continue; fi
    break
  done
  if ((code != 0)); then
    case $code in
      75) why=" (preempted: its checkpoint is saved; run the same command to resume)" ;;
      134) why=" (aborted: the JAX distributed service saw another process die; see its log)" ;;
      137) why=" (killed by SIGKILL)" ;;
      *) why="" ;;
    esac
    echo "launch/local.sh: process ${process} exited with status ${code}${why}" >&2
    status=1
  fi
done
exit $status
