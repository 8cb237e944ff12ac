"""run.dir, checkpoint.dir and data in a bucket: checkpoints through Orbax and TensorStore's own
GCS support, the run's other files copied next to them, documents and prepared data read from
it, and the one-line errors of buckets. Against
a GCS emulator on 127.0.0.1 (the `gcs_emulator` fixture in conftest.py)."""

import http.client
import json
import os
import re
import signal
import sys
import threading
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import fsspec
import pytest
from conftest import TINY, read_metrics, tiny_config, train_losses
from test_multihost import SHARED, free_port, logged_steps, start, wait_for
from test_prepare import bpe_tokenizer
from test_train import tensorboard_events

from jaxlm.data import sources
from jaxlm.data.prepare import prepare
from jaxlm.errors import ConfigError, DataError, UserError
from jaxlm.training.checkpoint import Checkpointer
from jaxlm.training.train import train


class RefusingProxy(ThreadingHTTPServer):
    """Passes requests on to the emulator, but answers those `refused(method, path)` picks as GCS
    answers a caller without permission: 403, which no client retries."""

    def __init__(self, refused: Callable[[str, str], bool]):
        super().__init__(("127.0.0.1", 0), _Forward)
        self.upstream = urllib.parse.urlsplit(os.environ["STORAGE_EMULATOR_HOST"]).netloc
        self.refused = refused
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def handle_error(self, request, client_address) -> None:
        """Clients hang up on requests they no longer need (gcsfs races two lookups and drops the
        slower one): nothing to report."""


class _Forward(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: RefusingProxy

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.server.refused(self.command, urllib.parse.unquote(self.path)):
            status, headers = 403, [("Content-Type", "application/json")]
            message = "jaxlm-tests@example.iam.gserviceaccount.com does not have access to the bucket"
            payload = json.dumps({"error": {"code": 403, "message": message}}).encode()
        else:
            upstream = http.client.HTTPConnection(self.server.upstream, timeout=60)
            passed = {
                k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection", "expect")
            }
            upstream.request(self.command, self.path, body, headers=passed)
            response = upstream.getresponse()
            status, payload = response.status, response.read()
            headers = [
                (k, v)
                for k, v in response.getheaders()
                if k.lower() not in ("connection", "content-length", "transfer-encoding")
            ]
            upstream.close()
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

    def log_message(self, *args) -> None:
        pass


def test_a_gs_url_without_gcsfs_is_one_line_naming_the_gcs_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # what an interpreter without gcsfs finds
    with pytest.raises(UserError) as refused:
        train(tiny_config(tmp_path, "checkpoint.dir=gs://jaxlm-test/run/checkpoints"))
    assert str(refused.value) == (
        "checkpoint.dir=gs://jaxlm-test/run/checkpoints needs gcsfs, which is not installed; "
        'pip install -e ".[gcs]" (or pip install "jaxlm[gcs]")'
    )


def test_a_missing_or_forbidden_bucket_is_one_line_naming_the_url(gcs_emulator, tmp_path, monkeypatch):
    with pytest.raises(UserError) as refused:
        train(tiny_config("gs://no-such-bucket/run"))
    assert str(refused.value) == (
        "run.dir=gs://no-such-bucket/run: bucket gs://no-such-bucket does not exist; "
        "create it or choose another run.dir"
    )
    with pytest.raises(
        UserError, match=r"^checkpoint.dir=gs://no-such-bucket/c: bucket gs://no-such-bucket "
    ):
        train(tiny_config(tmp_path, "checkpoint.dir=gs://no-such-bucket/c"))
    assert fsspec.filesystem("gs").ls("", refresh=True) == ["jaxlm-test/"]  # no bucket made by mistake

    everything = RefusingProxy(lambda method, path: True)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", everything.url)
    with pytest.raises(UserError) as refused:
        train(tiny_config("gs://jaxlm-test/run"))
    everything.shutdown()
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(
        "run.dir=gs://jaxlm-test/run: cannot list gs://jaxlm-test (OSError: Forbidden: "
    )
    assert "does not have access to the bucket" in message
    assert message.endswith("their access to the bucket, or choose another run.dir")


def test_a_failed_save_is_one_line_and_never_leaves_a_checkpoint_that_restores_as_complete(
    bucket_dir, monkeypatch, caplog
):
    # Every object of step 4 is written but its commit marker, the last one Orbax writes: what a
    # network failure or a lost permission at the end of a save leaves.
    marker = f"{bucket_dir.name}/checkpoints/4/commit_success.txt"
    proxy = RefusingProxy(lambda method, path: method == "POST" and marker in path)
    config = tiny_config(bucket_dir, "checkpoint.every=2", "train.profile_steps=[1,2]")
    with monkeypatch.context() as env:
        env.setenv("STORAGE_EMULATOR_HOST", proxy.url)
        with pytest.raises(UserError) as refused:
            train(config)
    proxy.shutdown()
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(
        f"checkpoint step 4 could not be written to {bucket_dir}/checkpoints (OSError: Forbidden: "
    )
    assert "the last complete checkpoint is step 2" in message
    assert (bucket_dir / "checkpoints" / "4" / "state").exists()
    with caplog.at_level("INFO", logger="jaxlm"):
        assert Checkpointer(config).latest_step() == 2
    assert f"ignoring incomplete checkpoint {bucket_dir}/checkpoints/4" in caplog.text
    # What the run wrote next to its checkpoints is there.
    assert list(train_losses(bucket_dir)) == [1, 2, 3, 4]
    assert "steps: 4" in (bucket_dir / "config.yaml").read_text()
    assert {event.step for event in tensorboard_events(bucket_dir) if event.summary.value} == {1, 2, 3, 4}
    traces = list((bucket_dir / "profile" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().length > 0


def committed_steps(checkpoints) -> list[int]:
    """The steps Orbax completed: on GCS, those with a commit marker. Listed afresh: gcsfs keeps
    the listings it made, and the processes a test starts write the bucket too."""
    fs = fsspec.filesystem("gs")
    fs.invalidate_cache()
    markers = [
        name.split("/")[-2] for name in fs.find(str(checkpoints)) if name.endswith("/commit_success.txt")
    ]
    return sorted({int(step) for step in markers if step.isdigit()})


@pytest.mark.multiprocess
def test_two_processes_with_the_run_in_a_bucket_stop_on_sigterm_survive_kill_9_and_resume_exactly(
    bucket_dir, tmp_path
):
    args = [
        *SHARED,
        "train.steps=100000",
        "checkpoint.every=2",
        f"run.dir={bucket_dir}",
        "distributed.heartbeat_timeout_s=5",
        "distributed.preemption_grace_s=20",
    ]
    checkpoints = bucket_dir / "checkpoints"

    # SIGTERM to one process: both save the step they agree on into the bucket and exit 75.
    logs = [tmp_path / f"sigterm-p{i}.log" for i in range(2)]
    port = free_port()
    processes = [start(i, 2, port, args, logs[i]) for i in range(2)]
    try:
        wait_for(lambda: logged_steps(bucket_dir) >= 3, 180, "three logged steps")
        processes[1].send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=60) for p in processes]
    finally:
        for p in processes:
            p.kill()
    assert codes == [75, 75], [log.read_text()[-2000:] for log in logs]
    stops = [int(re.search(r"preempted: stopping at step (\d+)", log.read_text()).group(1)) for log in logs]
    assert stops[0] == stops[1] and stops[0] in committed_steps(checkpoints)
    assert max(train_losses(bucket_dir)) == stops[0]  # what the run logged is in the bucket

    # kill -9 of one process once the resumed run has saved again: the other stops too.
    logs = [tmp_path / f"kill-p{i}.log" for i in range(2)]
    port = free_port()
    processes = [start(i, 2, port, args, logs[i]) for i in range(2)]
    try:
        wait_for(lambda: max(committed_steps(checkpoints)) > stops[0], 180, "a checkpoint after the resume")
        processes[1].kill()
        code = processes[0].wait(timeout=60)
    finally:
        for p in processes:
            p.kill()
    assert code not in (0, 75)
    assert f"resuming from checkpoint step {stops[0]}" in logs[0].read_text()

    # One process × 8 devices resumes from the last complete checkpoint: the three runs together
    # log each step once, with the losses of a run that never stopped.
    saved = max(committed_steps(checkpoints))
    train(
        tiny_config(
            bucket_dir, *SHARED[len(TINY) :], f"train.steps={saved + 1}", "mesh.data=1", "mesh.tensor=2"
        )
    )
    train(tiny_config(tmp_path / "reference", *SHARED[len(TINY) :], f"train.steps={saved + 1}"))
    assert [record["step"] for record in read_metrics(bucket_dir)] == list(range(1, saved + 2))
    purges = [event.step for event in tensorboard_events(bucket_dir) if event.session_log.status == 1]
    assert purges == [stops[0] + 1, saved + 1]  # TensorBoard hides the steps trained again
    reference, resumed = train_losses(tmp_path / "reference"), train_losses(bucket_dir)
    assert all(abs(resumed[step] - reference[step]) / reference[step] < 1e-4 for step in reference)


def upload(local, url) -> None:
    fs = fsspec.filesystem("gs")
    fs.put(str(local), str(url), recursive=True)
    fs.invalidate_cache()


def test_documents_in_a_bucket_are_the_documents_of_their_local_copy(bucket_dir, tmp_path, corpus):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["first row", "", "third row"]}), corpus / "rows.parquet")
    upload(corpus, bucket_dir / "corpus")
    local, remote = (sources.list_documents(str(path), "text") for path in (corpus, f"{bucket_dir}/corpus/"))
    assert [ref.name for ref in remote] == [ref.name for ref in local]  # so the same split
    assert all(ref.path.startswith(f"{bucket_dir}/corpus/") for ref in remote)
    texts = [sources.DocumentSource(refs, "text") for refs in (local, remote)]
    for index in (len(local) - 1, 0, 6, 5, 2):  # a parquet row, .txt files, .jsonl lines
        assert texts[1][index] == texts[0][index]
    jsonl = sources.list_documents(f"{bucket_dir}/corpus/*.jsonl", "text")
    assert [ref.name for ref in jsonl] == ["docs.jsonl:1", "docs.jsonl:2", "docs.jsonl:3"]
    one = sources.list_documents(f"{bucket_dir}/corpus/docs.jsonl", "text")
    assert [ref.name for ref in one] == [ref.name for ref in jsonl]

    with pytest.raises(DataError, match=rf"^data.path={bucket_dir}/nothing does not exist; point it at"):
        sources.list_documents(f"{bucket_dir}/nothing", "text")
    with pytest.raises(
        UserError, match=r"^data.path=gs://no-such-bucket/c: bucket gs://no-such-bucket does not"
    ):
        sources.list_documents("gs://no-such-bucket/c", "text")

    steps = ("train.steps=2", "train.eval_every=2")
    train(tiny_config(tmp_path / "local", f"data.path={corpus}", *steps))
    train(tiny_config(tmp_path / "remote", f"data.path={bucket_dir}/corpus", *steps))
    assert train_losses(tmp_path / "remote") == train_losses(tmp_path / "local")
    assert (
        read_metrics(tmp_path / "remote")[-1]["eval_loss"]
        == read_metrics(tmp_path / "local")[-1]["eval_loss"]
    )


def test_prepared_data_goes_to_a_bucket_and_trains_from_there(bucket_dir, tmp_path, corpus):
    tokenizer = bpe_tokenizer(tmp_path, corpus)
    upload(tokenizer, bucket_dir / "tokenizer.json")
    out = f"{bucket_dir}/prepared"
    data = tiny_config(tmp_path, f"data.path={corpus}", f"data.tokenizer={bucket_dir}/tokenizer.json").data
    manifest = prepare(data, out, shards=2, workers=2)
    names = sorted(path.name for path in (bucket_dir / "prepared").iterdir())
    assert names == sorted(
        ["manifest.json", *manifest["splits"]["train"]["files"], *manifest["splits"]["validation"]["files"]]
    )
    assert len(manifest["splits"]["train"]["files"]) == 2
    with pytest.raises(UserError, match=rf"^--out {out} is not empty; choose a new directory"):
        prepare(data, out, workers=1)
    with pytest.raises(
        UserError, match=r"^--out=gs://no-such-bucket/p: bucket gs://no-such-bucket does not exist"
    ):
        prepare(data, "gs://no-such-bucket/p", workers=1)

    steps = ("train.steps=2", "train.eval_every=2", "model.vocab_size=300")
    train(tiny_config(tmp_path / "text", f"data.path={corpus}", f"data.tokenizer={tokenizer}", *steps))
    train(tiny_config(tmp_path / "prepared", f"data.path={out}", f"data.tokenizer={tokenizer}", *steps))
    assert train_losses(tmp_path / "prepared") == train_losses(tmp_path / "text")
    with pytest.raises(ConfigError, match=rf"^data.path={out} was prepared with tokenizer tokenizer.json"):
        sources.document_sources(tiny_config(tmp_path, f"data.path={out}").data)


def test_a_run_in_a_bucket_loads_exports_to_a_bucket_and_starts_another(bucket_dir, tmp_path):
    import jax
    import numpy as np

    import jaxlm
    from jaxlm.inference.export import export

    run = bucket_dir / "run"
    train(tiny_config(run, "train.steps=2", "checkpoint.every=2", "train.eval_every=0"))
    loaded = jaxlm.load(str(run), devices=jax.devices()[:1])
    step = jaxlm.load(str(run / "checkpoints" / "2"), devices=jax.devices()[:1])
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), loaded.params, step.params))

    out = bucket_dir / "exported"
    export(str(run), str(out), devices=jax.devices()[:1])
    fs = fsspec.filesystem("gs")
    fs.invalidate_cache()
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json"} <= {
        p.name for p in out.iterdir()
    }
    fs.get(str(out), str(tmp_path / "exported"), recursive=True)
    exported = jaxlm.load(str(tmp_path / "exported"), devices=jax.devices()[:1])
    same = jax.tree.map(
        lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), loaded.params, exported.params
    )
    assert jax.tree.all(same)
    with pytest.raises(
        UserError, match=rf"^{out} exists and is not an empty directory; choose a new OUT_DIR"
    ):
        export(str(run), str(out), devices=jax.devices()[:1])
    with pytest.raises(
        UserError, match=r"is a Hugging Face directory in a bucket, which jaxlm reads from a disk only"
    ):
        jaxlm.load(str(out))

    train(tiny_config(tmp_path / "next", f"model.init_from={run}", "train.steps=1", "train.eval_every=0"))
    assert list(train_losses(tmp_path / "next")) == [1]
