"""`jaxlm eval`: lm-eval tasks through jaxlm's adapter score what lm-eval's own Hugging Face
backend scores on the same committed tiny models (tests/fixtures/lm_eval/reference.json, made once
by make_reference.py with torch and transformers, which CI never installs), on a sharded mesh,
zero- and few-shot; loss, perplexity and bits per byte of a dataset are the ones computed by hand
from the model's logits; train.eval_tasks logs task scores during training; bad input is one line.

The tasks are lm-eval YAML files over local .jsonl files (tests/fixtures/lm_eval), whose
data_files are relative to the repository root: the tests run there."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, read_metrics, tiny_config
from flax import nnx
from test_train import tensorboard_events

import jaxlm
from jaxlm.evaluation import evaluate

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # lm-eval's `datasets` reads the local files only
adapter = evaluate.lm_eval_adapter()

TASKS = REPO / "tests/fixtures/lm_eval"
MODELS = REPO / "tests/fixtures/hf"
REFERENCE = json.loads((TASKS / "reference.json").read_text())
LOGLIKELIHOOD_RTOL = 1e-4


@pytest.fixture(autouse=True)
def at_the_repository_root(monkeypatch):
    monkeypatch.chdir(REPO)


@pytest.fixture(scope="module")
def llama3_sharded():
    """The Llama 3 fixture (it prepends a BOS) over 8 devices: tensor=2 × fsdp=4."""
    return jaxlm.load(MODELS / "llama3", overrides=["mesh.tensor=2"])


def evaluate_like_the_reference(loaded, run: dict):
    lm = adapter.JaxlmLM(
        loaded, batch_size=REFERENCE["batch_size"], max_length=REFERENCE["max_length"], show_progress=False
    )
    results = adapter.run_tasks(
        lm,
        list(run["tasks"]),
        num_fewshot=run["num_fewshot"],
        include_path=str(TASKS),
        log_samples=True,
        bootstrap_iters=0,
    )
    return lm, results


def assert_same_as_the_reference(results: dict, run: dict) -> None:
    for task, expected in run["tasks"].items():
        for metric, value in expected["scores"].items():
            got = results["results"][task][metric]
            if metric.startswith(("acc", "exact_match")):
                assert got == value, (task, metric)
            else:
                assert got == pytest.approx(value, rel=LOGLIKELIHOOD_RTOL), (task, metric)
        samples = {str(s["doc_id"]): [r[0] for r in s["resps"]] for s in results["samples"][task]}
        assert samples.keys() == expected["samples"].keys()
        for doc_id, want in expected["samples"].items():
            got = samples[doc_id]
            if isinstance(want, str):  # generate_until: the very text
                assert got[0] == want, (task, doc_id)
            elif isinstance(want, float):  # loglikelihood_rolling
                assert got[0] == pytest.approx(want, rel=LOGLIKELIHOOD_RTOL), (task, doc_id)
            else:  # a multiple choice: [log-likelihood, is greedy] per choice
                assert [g for _, g in got] == [g for _, g in want], (task, doc_id)
                np.testing.assert_allclose(
                    [ll for ll, _ in got], [ll for ll, _ in want], rtol=LOGLIKELIHOOD_RTOL
                )


@pytest.mark.parametrize("run", ["zero_shot", "two_shot"])
def test_task_scores_and_samples_are_lm_evals_hugging_face_backends_on_a_sharded_mesh(llama3_sharded, run):
    expected = REFERENCE["models"]["llama3"][run]
    lm, results = evaluate_like_the_reference(llama3_sharded, expected)
    assert_same_as_the_reference(results, expected)
    assert set(results["n-shot"].values()) == {expected["num_fewshot"]}
    # Sorted and bucketed: a handful of compiled lengths for dozens of requests.
    assert len(lm.batch_shapes) <= 4, lm.batch_shapes


def test_few_shot_prompts_change_the_scores_the_reference_holds():
    # Guards the test above: the two-shot reference is not the zero-shot one again.
    runs = REFERENCE["models"]["llama3"]
    zero, two = (runs[run]["tasks"]["tiny_choice"]["samples"] for run in ("zero_shot", "two_shot"))
    assert zero != two


def test_a_model_without_bos_scores_as_lm_evals_backend_does():
    # Qwen2 adds no special token: empty contexts and rolling windows start from its EOS.
    expected = REFERENCE["models"]["qwen2"]["zero_shot"]
    _, results = evaluate_like_the_reference(
        jaxlm.load(MODELS / "qwen2", devices=jax.devices()[:1]), expected
    )
    assert_same_as_the_reference(results, expected)


def by_hand(loaded, examples: list[tuple[list[int], list[int]]]) -> tuple[float, int, int]:
    """Summed loss, scored targets and their bytes of (ids, trained) examples, each one alone
    (right-padded to 64 tokens, which a causal model's earlier positions never see) through the
    model's logits, the log-softmax taken with numpy: no packing, no eval step."""
    forward = jax.jit(lambda params, tokens: nnx.merge(loaded.setup.graphdef, params)(
        tokens, jnp.arange(64)[None], jnp.ones_like(tokens)).logits)  # fmt: skip
    token_bytes = loaded.tokenizer.token_bytes()
    loss, count, byte_count = 0.0, 0, 0
    for ids, trained in examples:
        targets, mask = np.asarray(ids[1:]), np.asarray(trained[1:], bool)
        tokens = np.zeros((1, 64), np.int32)
        tokens[0, : len(targets)] = ids[:-1]
        logits = np.asarray(forward(loaded.params, tokens)[0, : len(targets)], np.float64)
        largest = logits.max(-1, keepdims=True)
        log_probs = logits - largest - np.log(np.sum(np.exp(logits - largest), -1, keepdims=True))
        loss -= float(np.sum(log_probs[np.arange(len(targets)), targets][mask]))
        count += int(mask.sum())
        byte_count += int(token_bytes[targets][mask].sum())
    return loss, count, byte_count


def test_data_loss_perplexity_and_bits_per_byte_are_the_ones_computed_by_hand(tmp_path, llama3_sharded):
    data = llama3_sharded.config.data.model_copy(update={"seq_len": 64})
    loaded = dataclasses.replace(
        llama3_sharded, config=llama3_sharded.config.model_copy(update={"data": data})
    )
    one_device = jaxlm.load(MODELS / "llama3", devices=jax.devices()[:1])  # by hand: no sharding either
    tokenizer, eos = loaded.tokenizer, loaded.tokenizer.eos_id
    texts = [
        "Rivers flow downhill to the sea.",
        "def f(x):\n    return x * 2\n",
        "A" * 10 + " long one " * 20,
        "ok",
    ]
    (tmp_path / "texts.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    documents = []
    for text in texts:  # a document starts and ends with EOS; longer ones are cut every seq_len
        ids = [eos, *tokenizer.encode(text).tolist(), eos]
        documents += [
            (ids[start : start + 65], [1] * len(ids[start : start + 65]))
            for start in range(0, len(ids) - 1, 64)
        ]
    assert len(documents) > len(texts)  # one document takes more than one row

    scores = evaluate.evaluate_data(loaded, str(tmp_path / "texts.jsonl"), batch_size=4, show_progress=False)
    loss, count, byte_count = by_hand(one_device, documents)
    assert (scores.trained_tokens, scores.bytes) == (count, byte_count)
    assert scores.loss == pytest.approx(loss / count, rel=1e-5)
    assert scores.perplexity == pytest.approx(math.exp(loss / count), rel=1e-5)
    assert scores.bits_per_byte == pytest.approx(loss / math.log(2) / byte_count, rel=1e-5)

    # Prompt/completion records: only the completion (and its closing EOS) is scored.
    records = [("Q: 2 + 2?\nA:", " 4"), ("Say hi:", " hello there"), ("Name a colour:", " blue")]
    (tmp_path / "pairs.jsonl").write_text(
        "".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in records)
    )
    examples = []
    for prompt, completion in records:
        prompt_ids, completion_ids = tokenizer.encode(prompt).tolist(), tokenizer.encode(completion).tolist()
        ids = [eos, *prompt_ids, *completion_ids, eos]
        examples.append((ids, [0] * (1 + len(prompt_ids)) + [1] * (len(completion_ids) + 1)))
    scores = evaluate.evaluate_data(loaded, str(tmp_path / "pairs.jsonl"), batch_size=4, show_progress=False)
    loss, count, _ = by_hand(one_device, examples)
    assert scores.trained_tokens == count
    assert scores.loss == pytest.approx(loss / count, rel=1e-5)


def test_train_eval_tasks_log_task_scores_with_the_losses_and_jaxlm_eval_of_the_run_agrees(
    tmp_path, corpus, caplog
):
    """With LoRA: training scores the tasks with the adapters beside the weights, `jaxlm eval`
    with them merged in."""
    from jaxlm.training.train import train

    config = tiny_config(
        tmp_path / "run", f"data.path={corpus}", "train.eval_every=2",
        "train.eval_tasks=[tiny_choice,tiny_rolling,tiny_generate]", "train.eval_tasks_limit=2",
        f"train.eval_tasks_include_path={TASKS}", "checkpoint.every=4", "optim.lora.rank=4",
        "optim.lora.targets=[wq,wv,w_down]",
    )  # fmt: skip
    with caplog.at_level("INFO", logger="jaxlm"):
        train(config)
    evals = [record for record in read_metrics(tmp_path / "run") if "eval_loss" in record]
    assert [record["step"] for record in evals] == [2, 4]
    assert {key for key in evals[0] if key.startswith("eval/")} == {
        "eval/tiny_choice/acc", "eval/tiny_choice/acc_norm", "eval/tiny_rolling/word_perplexity",
        "eval/tiny_rolling/byte_perplexity", "eval/tiny_rolling/bits_per_byte", "eval/tiny_generate/exact_match",
    }  # fmt: skip
    for record in evals:
        assert 0 <= record["eval/tiny_choice/acc"] <= 1 and 0 <= record["eval/tiny_choice/acc_norm"] <= 1
        assert record["eval/tiny_rolling/bits_per_byte"] > 0
    assert evals[0]["eval/tiny_rolling/bits_per_byte"] != evals[1]["eval/tiny_rolling/bits_per_byte"]
    assert any("eval/tiny_choice/acc" in message for message in caplog.messages)
    tags = {value.tag for event in tensorboard_events(tmp_path / "run") for value in event.summary.value}
    assert {"eval/tiny_choice/acc", "eval/tiny_rolling/bits_per_byte"} <= tags

    # `jaxlm eval` of the run's last checkpoint scores what training scored at that step.
    report = evaluate.run_eval(
        jaxlm.load(tmp_path / "run"), data=str(corpus / "docs.jsonl"), tasks=["tiny_choice", "tiny_rolling"],
        limit=2, include_path=str(TASKS), max_length=32, bootstrap_iters=0,
    )  # fmt: skip
    results = report["tasks"]["results"]
    assert results["tiny_choice"]["acc,none"] == evals[1]["eval/tiny_choice/acc"]
    assert results["tiny_rolling"]["bits_per_byte,none"] == pytest.approx(
        evals[1]["eval/tiny_rolling/bits_per_byte"], rel=1e-5
    )
    assert report["data"]["loss"] > 0 and report["data"]["rows"] > 0


def test_an_unknown_training_task_is_refused_before_anything_is_built(tmp_path, corpus, caplog):
    from jaxlm.errors import UserError
    from jaxlm.training.train import train

    config = tiny_config(
        tmp_path / "run", f"data.path={corpus}", "train.eval_every=2", "train.eval_tasks=[tiny_choice,no_such_task]",
        f"train.eval_tasks_include_path={TASKS}",
    )  # fmt: skip
    with caplog.at_level("INFO", logger="jaxlm"), pytest.raises(UserError) as refused:
        train(config)
    assert "'no_such_task' is not installed nor in train.eval_tasks_include_path=" in str(refused.value)
    assert not caplog.messages and not (tmp_path / "run").exists()  # no set-up, no run directory


def test_eval_tasks_without_evaluations_are_refused_by_the_config():
    from jaxlm.config import load_config
    from jaxlm.errors import ConfigError

    with pytest.raises(ConfigError, match=r"train\.eval_every=0 has none; set train\.eval_every"):
        load_config(None, ["train.eval_tasks=[tiny_choice]", "train.eval_every=0"])


def jaxlm_eval(*args: str, python: tuple[str, ...] = ("-m", "jaxlm.cli")) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_DATASETS_OFFLINE": "1"}
    env.pop("XLA_FLAGS", None)
    return subprocess.run(
        [sys.executable, *python, "eval", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, result.stderr
    return errors[0]


def test_cli_scores_data_and_tasks_on_the_mesh_asked_for_and_writes_json(tmp_path):
    (tmp_path / "texts.jsonl").write_text(json.dumps({"text": "Rivers flow downhill to the sea."}) + "\n")
    result = jaxlm_eval(
        str(MODELS / "llama3"), "--data", str(tmp_path / "texts.jsonl"), "--tasks", "tiny_choice",
        "--include-path", str(TASKS), "--max-length", "128", "--batch-size", "4", "--bootstrap-iters", "0",
        "--output", str(tmp_path / "scores.json"), "mesh.tensor=2", "mesh.fsdp=2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "|tiny_choice|" in result.stdout.replace(" ", "") and "perplexity" in result.stdout
    report = json.loads((tmp_path / "scores.json").read_text())
    expected = REFERENCE["models"]["llama3"]["zero_shot"]["tasks"]["tiny_choice"]["scores"]
    assert report["tasks"]["results"]["tiny_choice"]["acc,none"] == expected["acc,none"]
    assert report["data"]["perplexity"] == pytest.approx(math.exp(report["data"]["loss"]))
    assert report["config"]["mesh"]["tensor"] == 2 and report["versions"]["lm_eval"]


@pytest.mark.multiprocess
def test_two_processes_score_the_tasks_as_lm_evals_backend_does(tmp_path):
    # A model sharded over the devices of two processes, generate_until among the tasks (its
    # tokens drawn across both): the scores of lm-eval's Hugging Face backend; process 0 reports.
    from test_multihost import run_processes

    expected = REFERENCE["models"]["llama3"]["zero_shot"]["tasks"]
    output = tmp_path / "scores.json"
    (out, err), (other_out, _) = run_processes(
        [
            "eval", str(MODELS / "llama3"), "--tasks", "tiny_choice,tiny_generate", "--include-path", str(TASKS),
            "--max-length", str(REFERENCE["max_length"]), "--batch-size", str(REFERENCE["batch_size"]),
            "--bootstrap-iters", "0", "--output", str(output), "mesh.tensor=2", "mesh.fsdp=2",
        ],
        env={"HF_DATASETS_OFFLINE": "1"},
    )  # fmt: skip
    assert "process 0 of 2" in err and "|tiny_generate|" in out.replace(" ", "")
    assert "tiny_" not in other_out  # only process 0 reports (Gloo's connection lines aside)
    results = json.loads(output.read_text())["tasks"]["results"]
    for task in ("tiny_choice", "tiny_generate"):
        for metric, value in expected[task]["scores"].items():
            assert results[task][metric] == pytest.approx(value, rel=LOGLIKELIHOOD_RTOL), (task, metric)


def test_cli_without_the_eval_extra_names_it_in_one_line():
    block_lm_eval = "import sys; sys.modules['lm_eval'] = None; from jaxlm.cli import main; sys.exit(main())"
    result = jaxlm_eval(str(MODELS / "llama3"), "--tasks", "tiny_choice", python=("-c", block_lm_eval))
    assert 'pip install -e ".[eval]"' in one_error_line(result)


def test_cli_names_a_task_that_is_not_found_and_the_include_path(tmp_path):
    result = jaxlm_eval(
        str(MODELS / "llama3"), "--tasks", "tiny_choice,no_such_task", "--include-path", str(TASKS)
    )
    line = one_error_line(result)
    assert "'no_such_task' is not installed" in line and "--include-path" in line
