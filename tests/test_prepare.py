"""`jaxlm prepare` tokenizes a corpus once into ArrayRecord shards; training from them sees exactly
the batches of training from the text, and a tokenizer other than the one that made them is
refused in one line."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, TINY, tiny_config, train_losses

from jaxlm.data import sources
from jaxlm.data.prepare import prepare
from jaxlm.errors import ConfigError, UserError
from jaxlm.training.train import train


def bpe_tokenizer(tmp_path, corpus):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.train(
        [str(p) for p in corpus.glob("*.txt")],
        trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<|endoftext|>"]),
    )
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def test_training_from_prepared_data_logs_the_losses_of_training_from_the_text(tmp_path, corpus):
    config = tiny_config(tmp_path / "text", f"data.path={corpus}", "train.steps=3", "train.eval_every=3")
    manifest = prepare(config.data, str(tmp_path / "prepared"), shards=2, workers=2)
    listed = sources.document_sources(config.data)
    assert [manifest["splits"][split]["documents"] for split in ("train", "validation")] == [
        len(listed[0]),
        len(listed[1]),
    ]
    assert manifest["splits"]["train"]["tokens"] == sum(
        len(listed[0][i].encode()) for i in range(len(listed[0]))
    )
    train(config)
    train(
        tiny_config(
            tmp_path / "prepared-run",
            f"data.path={tmp_path / 'prepared'}",
            "train.steps=3",
            "train.eval_every=3",
        )
    )
    assert train_losses(tmp_path / "prepared-run") == train_losses(tmp_path / "text")


def test_prepared_data_refuses_another_tokenizer_in_one_line(tmp_path, corpus):
    prepared = tmp_path / "prepared"
    prepare(tiny_config(tmp_path, f"data.path={corpus}").data, str(prepared), workers=1)
    tokenizer = bpe_tokenizer(tmp_path, corpus)
    with pytest.raises(
        ConfigError, match=r"was prepared with tokenizer byte and this run's is tokenizer.json \(sha256 "
    ):
        sources.document_sources(
            tiny_config(tmp_path, f"data.path={prepared}", f"data.tokenizer={tokenizer}").data
        )


def test_prepared_data_knows_the_end_token_its_tokenizer_resolved_however_the_config_named_it(
    tmp_path, corpus
):
    model = tmp_path / "llama3"
    shutil.copytree(REPO / "tests/fixtures/hf/llama3", model)  # its tokenizer_config names <|end_of_text|>
    tokenizer = f"data.tokenizer={model / 'tokenizer.json'}"
    prepared = tmp_path / "prepared"
    manifest = prepare(tiny_config(tmp_path, f"data.path={corpus}", tokenizer).data, str(prepared), workers=1)
    assert manifest["tokenizer"]["eos_token"] == "<|end_of_text|>"

    def check(*overrides):
        sources.document_sources(tiny_config(tmp_path, f"data.path={prepared}", tokenizer, *overrides).data)

    check("data.eos_token=<|end_of_text|>")  # as model.init_from of the directory sets it
    written = json.loads((prepared / "manifest.json").read_text())
    written["tokenizer"]["eos_token"] = None  # as manifests were written before they resolved it
    (prepared / "manifest.json").write_text(json.dumps(written))
    check("data.eos_token=<|end_of_text|>")
    with pytest.raises(
        ConfigError, match=r"was prepared with tokenizer tokenizer.json .*eos_token <\|end_of_text\|>"
    ):
        check("data.eos_token=<|eot_id|>")


def test_prepare_never_overwrites_and_takes_documents_not_prepared_data(tmp_path, corpus):
    prepared = tmp_path / "prepared"
    data = tiny_config(tmp_path, f"data.path={corpus}").data
    prepare(data, str(prepared), workers=1)
    before = {p.name: p.read_bytes() for p in prepared.iterdir()}
    with pytest.raises(UserError, match=r"--out .*prepared is not empty; choose a new directory"):
        prepare(data, str(prepared), workers=1)
    assert {p.name: p.read_bytes() for p in prepared.iterdir()} == before
    with pytest.raises(UserError, match=r"is prepared data already; point it at the documents"):
        prepare(tiny_config(tmp_path, f"data.path={prepared}").data, str(tmp_path / "again"), workers=1)


def test_the_prepare_command_tokenizes_in_worker_processes_and_writes_a_manifest(tmp_path, corpus):
    tokenizer = bpe_tokenizer(tmp_path, corpus)
    result = subprocess.run(
        [sys.executable, "-m", "jaxlm.cli", "prepare", "configs/tiny.yaml", *TINY, f"data.path={corpus}",
         f"data.tokenizer={tokenizer}", "--out", str(tmp_path / "prepared"), "--workers", "2"],
        cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "jaxlm[p0] prepared " in result.stderr and "tokens/s) into" in result.stderr
    manifest = json.loads((tmp_path / "prepared" / "manifest.json").read_text())
    assert manifest["tokenizer"]["tokenizer"] == "tokenizer.json" and manifest["vocab_size"] == 300
    assert manifest["splits"]["train"]["tokens"] > 0
