"""Launchers: the GKE JobSet renders to what GKE and JAX's detection need; local.sh reports failure."""

import os
import subprocess
import sys

import yaml
from conftest import REPO


def render(*args: str) -> dict:
    result = subprocess.run(
        [sys.executable, "launch/gke/render.py", *args], cwd=REPO, capture_output=True, text=True, check=True
    )
    return yaml.safe_load(result.stdout)


def pod_spec(jobset: dict) -> dict:
    return jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]


def test_gke_tpu_jobset_has_one_pod_per_host_on_each_slice():
    jobset = render(
        "--name", "llama", "--image", "registry/jaxlm:1", "--tpu", "v5p", "--topology", "4x4x4", "--slices", "2",
        "configs/tiny.yaml", "mesh.dcn_data=2", "checkpoint.dir=gs://bucket/llama",
    )  # fmt: skip
    assert jobset["apiVersion"].startswith("jobset.x-k8s.io/") and jobset["kind"] == "JobSet"
    assert (
        jobset["metadata"]["annotations"]["alpha.jobset.sigs.k8s.io/exclusive-topology"]
        == "cloud.google.com/gke-nodepool"
    )
    workers = jobset["spec"]["replicatedJobs"][0]
    assert workers["replicas"] == 2  # slices
    job = workers["template"]["spec"]
    assert job["parallelism"] == job["completions"] == 16  # 64 chips / 4 per host
    assert job["completionMode"] == "Indexed"
    spec = pod_spec(jobset)
    assert spec["nodeSelector"] == {
        "cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
        "cloud.google.com/gke-tpu-topology": "4x4x4",
    }
    container = spec["containers"][0]
    assert container["resources"]["limits"] == {"google.com/tpu": 4}
    command = container["args"][0]
    assert command.startswith(
        "jaxlm train configs/tiny.yaml mesh.dcn_data=2 checkpoint.dir=gs://bucket/llama"
    )
    assert "distributed.coordinator_address" not in command  # JAX's GKE TPU detection finds it
    assert spec["terminationGracePeriodSeconds"] > 100 and "distributed.preemption_grace_s=110" in command


def test_gke_gpu_jobset_names_the_coordinator_and_process_ids():
    jobset = render("--name", "gpt", "--image", "img", "--gpu", "h100", "--nodes", "4", "configs/tiny.yaml")
    job = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]
    assert job["parallelism"] == 4 and jobset["spec"]["replicatedJobs"][0]["replicas"] == 1
    container = pod_spec(jobset)["containers"][0]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 8}
    command = container["args"][0]
    assert "distributed.coordinator_address=gpt-workers-0-0.gpt:8476" in command
    assert "distributed.num_processes=4" in command
    assert "distributed.process_id=${JOB_COMPLETION_INDEX}" in command  # expanded by bash in the pod
    assert container["ports"] == [{"containerPort": 8476}]


def test_local_launcher_exits_nonzero_and_names_the_failed_process(tmp_path):
    env = {
        **os.environ,
        "JAXLM": f"{sys.executable} -m jaxlm.cli",
        "PYTHON": sys.executable,
        "JAX_PLATFORMS": "cpu",
    }
    result = subprocess.run(
        ["bash", "launch/local.sh", "2", "configs/tiny.yaml", "mesh.fsdp=3", f"run.dir={tmp_path}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1
    assert (
        "jaxlm[p0]: error: mesh data=1 fsdp=3 expert=1 context=1 tensor=1 uses 3 devices but there are 8"
        in result.stderr
    )
    assert "launch/local.sh: process 0 exited with status 2" in result.stderr
    assert "launch/local.sh: process 1 exited with status 2" in result.stderr


def test_local_launcher_usage_error():
    result = subprocess.run(["bash", "launch/local.sh", "two"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and "usage: launch/local.sh N CONFIG" in result.stderr
