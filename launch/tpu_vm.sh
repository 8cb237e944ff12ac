#!/usr/bin/env bash
# jaxlm on a Cloud TPU VM pod slice: copy this checkout to every worker, install it, and run the
# same command on all of them. JAX's auto-detection reads the TPU metadata on each worker, so no
# coordinator address is needed.
#
#   launch/tpu_vm.sh TPU_NAME ZONE CONFIG [key=value ...]
#   launch/tpu_vm.sh my-v5p-128 us-east5-a configs/llama_1b.yaml checkpoint.dir=gs://my-bucket/llama1b
#
# Environment: PROJECT (gcloud project, default: gcloud's), REMOTE_DIR (default ~/jaxlm),
# SKIP_INSTALL=1 to reuse an existing install. Checkpoints must go to storage every worker sees:
# set checkpoint.dir to a gs:// bucket. Metrics and TensorBoard files are written by worker 0
# under run.dir on its own disk (or a mounted bucket).
#
# Preemption: a TPU VM about to be preempted or under maintenance gets SIGTERM; the workers agree
# on a step, save it, and exit with status 75. Run the same command again to resume.
set -euo pipefail

if [[ $# -lt 3 ]]; then
  echo "usage: launch/tpu_vm.sh TPU_NAME ZONE CONFIG [key=value ...]" >&2
  exit 2
fi
tpu=$1 zone=$2 config=$3
shift 3
remote_dir=${REMOTE_DIR:-jaxlm}
gcloud_args=(--zone "$zone" --worker=all)
[[ -n ${PROJECT:-} ]] && gcloud_args+=(--project "$PROJECT")
repo=$(cd "$(dirname "$0")/.." && pwd)

on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$tpu" "${gcloud_args[@]}" --command "$1"
}

echo "syncing $repo to $tpu:~/$remote_dir on every worker" >&2
tarball=$(mktemp --suffix=.tar.gz)
trap 'rm -f "$tarball"' EXIT
git -C "$repo" ls-files -z --cached --others --exclude-standard | tar -C "$repo" -czf "$tarball" --null -T -
gcloud compute tpus tpu-vm scp "$tarball" "$tpu:/tmp/jaxlm.tar.gz" "${gcloud_args[@]}"
on_all_workers "mkdir -p ~/$remote_dir && tar -xzf /tmp/jaxlm.tar.gz -C ~/$remote_dir"

if [[ -z ${SKIP_INSTALL:-} ]]; then
  on_all_workers "cd ~/$remote_dir && python3 -m venv .venv && .venv/bin/pip install -q -e . 'jax[tpu]'"
fi

quoted=$(printf ' %q' "$config" "$@")
on_all_workers "cd ~/$remote_dir && .venv/bin/jaxlm train$quoted"
