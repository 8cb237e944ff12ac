"""Render launch/gke/jobset.yaml for a TPU slice (or several) or a GPU node pool.

    python launch/gke/render.py --name llama1b --image REGISTRY/jaxlm:TAG --tpu v5p --topology 4x4x4 \
        configs/llama_1b.yaml checkpoint.dir=gs://bucket/llama1b | kubectl apply -f -
    python launch/gke/render.py --name gpt2 --image REGISTRY/jaxlm:TAG --gpu h100 --nodes 4 configs/gpt2.yaml

TPU pods: GKE's TPU webhook sets TPU_WORKER_HOSTNAMES and TPU_WORKER_ID in each pod (and the
MEGASCALE_* variables for several slices), which JAX's auto-detection reads: jaxlm needs no
address. GPU pods: the coordinator is pod 0 of the JobSet, reached through the JobSet's headless
service; the process id is the pod's JOB_COMPLETION_INDEX.
"""

from __future__ import annotations

import argparse
import math
import shlex
import string
import sys
from pathlib import Path

TEMPLATE = Path(__file__).with_name("jobset.yaml")
COORDINATOR_PORT = 8476

# GKE node labels and chips per host of the TPU generations jaxlm plans for.
TPU_ACCELERATORS = {
    "v4": ("tpu-v4-podslice", 4),
    "v5e": ("tpu-v5-lite-podslice", 4),
    "v5p": ("tpu-v5p-slice", 4),
    "v6e": ("tpu-v6e-slice", 4),
}
GPU_ACCELERATORS = {"h100": "nvidia-h100-80gb", "h200": "nvidia-h200-141gb", "a100": "nvidia-a100-80gb"}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--name", required=True, help="JobSet name (DNS label)")
    parser.add_argument("--image", required=True, help="container image with jaxlm installed")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--tpu", choices=sorted(TPU_ACCELERATORS), help="TPU generation")
    target.add_argument("--gpu", choices=sorted(GPU_ACCELERATORS), help="GPU type")
    parser.add_argument("--topology", help="TPU slice topology, e.g. 4x4x4 (v4/v5p) or 16x16 (v5e/v6e)")
    parser.add_argument("--slices", type=int, default=1, help="TPU slices (multi-slice over DCN)")
    parser.add_argument("--nodes", type=int, default=1, help="GPU nodes")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--grace-period", type=int, default=120, help="seconds between SIGTERM and kill")
    parser.add_argument("--max-restarts", type=int, default=3, help="JobSet restarts (each resumes)")
    parser.add_argument("config", help="config path inside the image")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    if args.tpu and not args.topology:
        parser.error("--tpu needs --topology")
    return args


def render(args: argparse.Namespace) -> str:
    overrides = list(args.overrides)
    if args.tpu:
        label, chips_per_host = TPU_ACCELERATORS[args.tpu]
        chips = math.prod(int(side) for side in args.topology.split("x"))
        hosts, per_host = max(1, chips // chips_per_host), min(chips, chips_per_host)
        node_selector = {
            "cloud.google.com/gke-tpu-accelerator": label,
            "cloud.google.com/gke-tpu-topology": args.topology,
        }
        env = {"JAX_PLATFORMS": "tpu,cpu"}
        resource, slices = "google.com/tpu", args.slices
        overrides += [f"distributed.preemption_grace_s={args.grace_period - 10}"]
    else:
        hosts, per_host, slices = args.nodes, args.gpus_per_node, 1
        node_selector = {"cloud.google.com/gke-accelerator": GPU_ACCELERATORS[args.gpu]}
        env = {"NCCL_DEBUG": "WARN"}
        resource = "nvidia.com/gpu"
        coordinator = f"{args.name}-workers-0-0.{args.name}:{COORDINATOR_PORT}"
        overrides += [
            f"distributed.coordinator_address={coordinator}",
            f"distributed.num_processes={hosts}",
            "distributed.process_id=${JOB_COMPLETION_INDEX}",
            f"distributed.local_device_ids=[{','.join(str(i) for i in range(per_host))}]",
            f"distributed.preemption_grace_s={args.grace_period - 10}",
        ]
    command = " ".join(["jaxlm", "train", shlex.quote(args.config), *(_quote(o) for o in overrides)])
    fields = {
        "name": args.name,
        "image": args.image,
        "slices": slices,
        "hosts_per_slice": hosts,
        "max_restarts": args.max_restarts,
        "grace_period_s": args.grace_period,
        "coordinator_port": COORDINATOR_PORT,
        "accelerator_resource": resource,
        "accelerators_per_host": per_host,
        "command": _yaml_string(command),
        "node_selector": "\n".join(f"                {k}: {v}" for k, v in node_selector.items()),
        "env": "\n".join(
            f"                    - name: {k}\n                      value: {_yaml_string(v)}"
            for k, v in env.items()
        ),
    }
    return string.Template(TEMPLATE.read_text()).substitute(fields)


def _quote(override: str) -> str:
    # ${JOB_COMPLETION_INDEX} must reach bash unquoted to expand; everything else is quoted.
    return override if "${" in override else shlex.quote(override)


def _yaml_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def main(argv: list[str] | None = None) -> int:
    sys.stdout.write(render(parse_args(sys.argv[1:] if argv is None else argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
