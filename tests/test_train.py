"""The runner: metrics, eval, checkpoints, exact resume, and refusing to go on after a NaN."""

import math

import pytest
import yaml
from conftest import read_metrics, tiny_config, train_losses

from jaxlm.errors import TrainingDiverged, UserError
from jaxlm.training.checkpoint import Checkpointer
from jaxlm.training.train import train

RESUMABLE = ["train.steps=8", "checkpoint.every=2", "optim.schedule_steps=8", "mesh.fsdp=4", "mesh.data=2"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    train(tiny_config(run_dir, *RESUMABLE, "train.eval_every=4"))
    return run_dir


def test_metrics_have_the_promised_fields_every_log_step(uninterrupted):
    records = read_metrics(uninterrupted)
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == list(range(1, 9))
    for record in train_records:
        for field in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"):
            assert isinstance(record[field], float | int) and math.isfinite(record[field])
    assert train_records[-1]["tokens_per_s"] > 0 and train_records[-1]["mfu"] > 0
    assert train_records[-1]["loss"] < train_records[0]["loss"]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [4, 8]
    for r in evals:  # byte tokens are 1 byte each; the end-of-document token stands for none
        assert r["eval_loss"] / math.log(2) <= r["eval_bits_per_byte"] < 1.05 * r["eval_loss"] / math.log(2)
    assert list((uninterrupted / "tensorboard").glob("events.out.tfevents.*"))
    resolved = yaml.safe_load((uninterrupted / "config.yaml").read_text())
    assert resolved["train"]["steps"] == 8 and resolved["model"]["head_dim"] == 16


def test_checkpoints_keep_the_newest_n(uninterrupted):
    steps = sorted(int(p.name) for p in (uninterrupted / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [4, 6, 8]  # checkpoint.keep=3 of saves at 2, 4, 6, 8


def test_resumed_run_logs_exactly_the_losses_of_an_uninterrupted_one(tmp_path, uninterrupted):
    # First half: stop at step 4 (same schedule), then resume to step 8 from the checkpoint.
    train(tiny_config(tmp_path, *RESUMABLE, "train.eval_every=4", "train.steps=4"))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
    result = train(tiny_config(tmp_path, *RESUMABLE, "train.eval_every=4"))
    assert result.step == 8
    expected, resumed = train_losses(uninterrupted), train_losses(tmp_path)
    assert resumed.keys() == expected.keys()
    for step in expected:
        assert abs(resumed[step] - expected[step]) <= 1e-6, (step, resumed[step], expected[step])
    # What the data counted carries over too.
    seen = ("tokens_seen", "documents_seen", "epoch")
    last_resumed = [r for r in read_metrics(tmp_path) if "loss" in r][-1]
    last_expected = [r for r in read_metrics(uninterrupted) if "loss" in r][-1]
    assert {k: last_resumed[k] for k in seen} == {k: last_expected[k] for k in seen}
    expected_eval = [r["eval_loss"] for r in read_metrics(uninterrupted) if "eval_loss" in r]
    resumed_eval = [r["eval_loss"] for r in read_metrics(tmp_path) if "eval_loss" in r]
    assert resumed_eval == pytest.approx(expected_eval, abs=1e-6)


def test_resume_onto_another_mesh_restores_resharded_state(tmp_path, uninterrupted):
    first = tiny_config(tmp_path, *RESUMABLE, "train.steps=4")
    train(first)
    # Also unrolled, rematerialised, with other cuDNN document slots and splash blocks: they
    # change how the step runs, not the parameters.
    resumed = (
        "mesh.data=1",
        "mesh.fsdp=4",
        "mesh.tensor=2",
        "model.scan_layers=false",
        "model.remat=custom",
        "model.remat_save=[mlp_gate]",
        "attention.max_documents=3",
        "attention.splash_block_q=256",
    )
    train(tiny_config(tmp_path, *RESUMABLE, *resumed))
    expected, resumed = train_losses(uninterrupted), train_losses(tmp_path)
    for step in range(5, 9):
        assert abs(resumed[step] - expected[step]) / expected[step] < 1e-4


def test_a_finished_run_does_nothing_more(uninterrupted):
    before = (uninterrupted / "metrics.jsonl").read_text()
    assert train(tiny_config(uninterrupted, *RESUMABLE)).step == 8
    assert (uninterrupted / "metrics.jsonl").read_text() == before


def test_checkpoint_of_another_model_is_refused_with_one_line(tmp_path, uninterrupted):
    config = tiny_config(
        tmp_path, *RESUMABLE, "model.mlp_dim=64", f"checkpoint.dir={uninterrupted / 'checkpoints'}"
    )
    with pytest.raises(UserError, match=r"different model \(model.mlp_dim differ\)"):
        train(config)


def test_checkpoint_of_another_data_worker_count_is_refused_with_one_line(tmp_path, uninterrupted):
    # Grain's workers each pack their own slice of the documents: a position saved by threads
    # (worker_count 0) fails to restore into workers, and one of 2 workers silently restores into
    # 3 at the wrong place.
    checkpoints = uninterrupted / "checkpoints"
    before = sorted(str(p.relative_to(checkpoints)) for p in checkpoints.rglob("*"))
    config = tiny_config(tmp_path, *RESUMABLE, "data.worker_count=1", f"checkpoint.dir={checkpoints}")
    with pytest.raises(
        UserError,
        match=r"saved with data.worker_count=0 and this run sets 1: resume with data.worker_count=0",
    ):
        train(config)
    assert sorted(str(p.relative_to(checkpoints)) for p in checkpoints.rglob("*")) == before


def test_a_damaged_checkpoint_is_named_with_one_line_and_the_run_resumes_once_it_is_moved_aside(
    tmp_path, uninterrupted
):
    train(tiny_config(tmp_path, *RESUMABLE, "train.steps=6"))
    checkpoints = tmp_path / "checkpoints"
    largest = max((checkpoints / "6" / "state").rglob("*"), key=lambda p: p.is_file() and p.stat().st_size)
    largest.write_bytes(largest.read_bytes()[:1000])  # a write cut short, a disk error
    before = {p: p.read_bytes() for p in checkpoints.rglob("*") if p.is_file()}
    with pytest.raises(UserError) as refused:
        train(tiny_config(tmp_path, *RESUMABLE))
    message = str(refused.value)
    assert "\n" not in message and message.startswith(
        f"checkpoint step 6 in {checkpoints} cannot be restored ("
    )
    assert message.endswith(
        f"move it aside (mv {checkpoints / '6'} {checkpoints / 'damaged-6'}) to resume from step 4"
    )
    assert {p: p.read_bytes() for p in checkpoints.rglob("*") if p.is_file()} == before
    # The refused run leaves the run's config as the checkpoints' run wrote it.
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]["steps"] == 6

    (checkpoints / "6").rename(checkpoints / "damaged-6")
    assert train(tiny_config(tmp_path, *RESUMABLE)).step == 8
    expected, resumed = train_losses(uninterrupted), train_losses(tmp_path)
    assert all(abs(resumed[step] - expected[step]) <= 1e-6 for step in range(5, 9))


def test_a_run_or_checkpoint_dir_that_is_a_file_is_refused_with_one_line(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    with pytest.raises(
        UserError, match=r"run.dir=.*a_file is a file, not a directory; choose another run.dir"
    ):
        train(tiny_config(a_file))
    with pytest.raises(UserError, match=r"run.dir=.*a_file/run cannot be created \(Not a directory\)"):
        train(tiny_config(a_file / "run"))
    # Orbax would only fail in its background save thread, and training would wait for it forever.
    with pytest.raises(UserError, match=r"checkpoint.dir=.*a_file is a file, not a directory"):
        train(tiny_config(tmp_path / "run", f"checkpoint.dir={a_file}"))
    assert a_file.read_text() == "not a directory"


def test_a_train_state_larger_than_the_host_is_refused_before_it_is_allocated(tmp_path):
    # 10^11 embedding rows: 1.2 PB of float32 parameters and AdamW moments.
    with pytest.raises(UserError, match=r"need \d+\.\d GB on this host's CPU devices and it has"):
        train(tiny_config(tmp_path, "model.vocab_size=100000000000"))
    assert not (tmp_path / "checkpoints").exists()


def test_resuming_with_changed_settings_lists_them_and_warns_of_a_learning_rate_jump(
    tmp_path, uninterrupted, caplog
):
    import shutil

    shutil.copytree(uninterrupted / "checkpoints", tmp_path / "checkpoints")
    # Extend the run past its 8-step schedule without fixing the schedule's length.
    extended = tiny_config(
        tmp_path,
        *RESUMABLE,
        "train.steps=9",
        "optim.schedule_steps=0",
        "checkpoint.every=0",
        "train.eval_every=0",
    )
    with caplog.at_level("INFO", logger="jaxlm"):
        train(extended)
    assert (
        "resuming with changed settings: train.steps 8 -> 9, train.eval_every 4 -> 0, optim.schedule_steps 8 -> 0"
        in caplog.text
    )
    assert "the learning-rate schedule now spans 9 steps instead of the checkpoint's 8" in caplog.text
    assert "set optim.schedule_steps=8 to continue the old one" in caplog.text


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    train(tiny_config(tmp_path, "train.steps=2", "checkpoint.every=2", "optim.schedule_steps=6"))
    good = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    diverging = tiny_config(
        tmp_path,
        "train.steps=6",
        "checkpoint.every=2",
        "optim.schedule_steps=6",
        "optim.lr=1e30",
        "optim.clip_norm=0",
    )
    with pytest.raises(
        TrainingDiverged, match=r"loss is nan at step \d; the last checkpoint \(step 2\) is intact"
    ):
        train(diverging)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == good
    assert Checkpointer(diverging).latest_step() == 2


def test_an_interrupted_save_is_reported_and_never_resumed_from(tmp_path, uninterrupted, caplog):
    import shutil

    train(tiny_config(tmp_path, *RESUMABLE, "train.steps=4"))
    # What an interrupted save of step 6 leaves: Orbax's temporary directory, never renamed.
    shutil.copytree(tmp_path / "checkpoints" / "4", tmp_path / "checkpoints" / "6.orbax-checkpoint-tmp-1234")
    (tmp_path / "checkpoints" / "6.orbax-checkpoint-tmp-1234" / "state").rename(tmp_path / "partial")
    with caplog.at_level("INFO", logger="jaxlm"):
        train(tiny_config(tmp_path, *RESUMABLE))
    assert "ignoring incomplete checkpoint" in caplog.text and "6.orbax-checkpoint-tmp-1234" in caplog.text
    assert "resuming from checkpoint step 4" in caplog.text
    expected, resumed = train_losses(uninterrupted), train_losses(tmp_path)
    assert all(abs(resumed[step] - expected[step]) <= 1e-6 for step in range(5, 9))


def test_profile_steps_write_a_trace_into_the_run_dir(tmp_path):
    train(tiny_config(tmp_path, "train.steps=3", "train.profile_steps=[2,3]"))
    traces = list((tmp_path / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0


def test_pinning_host_memory_for_saves_copies_one_replica_and_leaves_the_state_intact(caplog):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    from jaxlm.training.checkpoint import orbax_pins_host_memory, pin_host_memory, shards_to_save

    mesh = jax.make_mesh((4, 2), ("fsdp", "data"))
    sharded = jax.device_put(jnp.arange(64.0).reshape(8, 8), NamedSharding(mesh, PartitionSpec("fsdp")))
    replicated = jax.device_put(jnp.ones(16, jnp.bfloat16), NamedSharding(mesh, PartitionSpec()))
    state = {"w": sharded, "scale": replicated}
    assert not orbax_pins_host_memory(state)  # Orbax pins on GPUs only; the copy itself runs anywhere
    # One replica: the 8x8 float32 array once (4 shards, 256 bytes), 16 bfloat16 once (32 bytes).
    assert sum(shard.nbytes for shard in shards_to_save(state)) == 256 + 32
    with caplog.at_level("INFO", logger="jaxlm"):
        pin_host_memory(state).join()
    assert "pinned 0.00 GB of host memory for checkpoint saves" in caplog.text
    assert not sharded.is_deleted() and not replicated.is_deleted()
    np.testing.assert_array_equal(np.asarray(state["w"]), np.arange(64.0).reshape(8, 8))


def test_a_checkpoint_saved_before_model_families_and_newer_model_keys_resumes_as_llama(
    tmp_path, uninterrupted
):
    import json
    import shutil

    shutil.copytree(uninterrupted / "checkpoints", tmp_path / "checkpoints")
    metadata = tmp_path / "checkpoints" / "8" / "config" / "metadata"
    saved = json.loads(metadata.read_text())
    for key in ("family", "qkv_bias", "rope_scaling", "context_length", "init_from"):
        del saved["model"][key]
    metadata.write_text(json.dumps(saved))
    assert train(tiny_config(tmp_path, *RESUMABLE, "train.steps=9", "optim.schedule_steps=8")).step == 9


def test_sigterm_to_an_in_process_run_saves_and_returns_without_killing_the_caller(tmp_path):
    # A notebook or a test calling jaxlm.training.train: preemption saves and stops the run; the grace
    # period (here far too short for any write) can only raise, never end the caller's process.
    import os
    import re
    import signal
    import threading
    import time

    from jaxlm.errors import PreemptionGraceExpired

    def sigterm_once_training() -> None:
        while not (tmp_path / "metrics.jsonl").exists() or not read_metrics(tmp_path):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=sigterm_once_training, daemon=True).start()
    config = tiny_config(tmp_path, "train.steps=100000", "distributed.preemption_grace_s=0.000001")
    try:
        result = train(config)
    except PreemptionGraceExpired as expired:
        assert "was not written within distributed.preemption_grace_s=1e-06s" in str(expired)
        # The write goes on in the background and completes.
        step = re.search(r"checkpoint of step (\d+)", str(expired)).group(1)
        deadline = time.monotonic() + 60
        while not (tmp_path / "checkpoints" / step / "_CHECKPOINT_METADATA").exists():
            assert time.monotonic() < deadline, "the abandoned write never completed"
            time.sleep(0.1)
    else:  # the write beat even that grace period
        assert result.preempted and result.step < 100000


def tensorboard_events(run_dir):
    """Every event of the run's TensorBoard files, in file order (TFRecord framing: length,
    its CRC, the record, its CRC)."""
    import struct

    from tensorboardX.proto import event_pb2

    events = []
    for path in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            events.append(event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length]))
            offset += 12 + length + 4
    return events


def test_a_resumed_run_leaves_each_step_once_in_metrics_and_tensorboard(tmp_path):
    # The first run logged steps 5 and 6 past the checkpoint it is resumed from (4), and was
    # killed while writing a line.
    train(tiny_config(tmp_path, *RESUMABLE, "train.steps=6", "checkpoint.every=4"))
    (tmp_path / "checkpoints" / "6").rename(tmp_path / "checkpoints" / "damaged-6")
    with (tmp_path / "metrics.jsonl").open("a") as metrics:
        metrics.write('{"step": 7, "lo')
    train(tiny_config(tmp_path, *RESUMABLE))
    assert [record["step"] for record in read_metrics(tmp_path)] == list(range(1, 9))
    # TensorBoard hides what came before a purge marker at the resumed run's first step.
    purges = [event.step for event in tensorboard_events(tmp_path) if event.session_log.status == 1]
    assert purges == [5]
