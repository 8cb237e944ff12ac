"""docs/finetune.md, shortened: pretrain the tiny model, write the page's addition task, measure it,
fine-tune on it, and the task's accuracy rises."""

import re

from conftest import REPO

from jaxlm import load
from jaxlm.config import load_config
from jaxlm.evaluation import evaluate
from jaxlm.training.train import train

PAGE = REPO / "docs/finetune.md"


def task_accuracy(run_dir, task_dir) -> float:
    report = evaluate.run_eval(
        load(str(run_dir)), tasks=["addition"], include_path=str(task_dir), batch_size=64, limit=64
    )
    return report["tasks"]["results"]["addition"]["exact_match,none"]


def test_the_finetuning_walkthrough_raises_the_task_accuracy(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(re.search(r"```python\n(.*?)```", PAGE.read_text(), re.S).group(1), {})  # the page's task script
    task = tmp_path / "addition"
    assert len((task / "train.jsonl").read_text().splitlines()) == 2300

    pretrained, finetuned = tmp_path / "runs/tiny", tmp_path / "runs/sft_tiny"
    train(
        load_config(
            REPO / "configs/tiny.yaml", [f"run.dir={pretrained}", "train.steps=60", "train.eval_every=0"]
        )
    )
    before = task_accuracy(pretrained, task)

    # The page's fine-tuning command, with fewer steps.
    config = load_config(
        REPO / "configs/finetune_tiny.yaml",
        [
            f"model.init_from={pretrained}",
            f"data.path={task / 'train.jsonl'}",
            f"run.dir={finetuned}",
            "train.steps=300",
            "train.eval_every=0",
            "checkpoint.every=1000",  # saved once, at the end
        ],
    )
    result = train(config)
    after = task_accuracy(finetuned, task)
    assert result.metrics["loss"] < 1.0
    assert before <= 0.05 and after >= before + 0.2, (before, after)  # 0.0 → 0.31 when written
