"""Instruction data: prompt/completion and chat records, chat templates rendered as transformers
renders them, loss masks on the answers only, whole-example packing, reports of what is left
out, and training on it with an exact resume."""

import json
import logging
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, read_metrics, tiny_config, train_losses
from test_cli import jaxlm

from jaxlm.data import pipeline, prepare, sources
from jaxlm.data.chat import load_chat_template
from jaxlm.data.counts import DataCounts
from jaxlm.data.instructions import chat_example, prompt_completion_example
from jaxlm.data.tokenizers import ByteTokenizer, load_tokenizer
from jaxlm.errors import DataError
from jaxlm.model.layers import attention_mask
from jaxlm.training.train import train

CHAT_FIXTURES = REPO / "tests" / "fixtures" / "chat"
EXPECTED = json.loads((CHAT_FIXTURES / "expected.json").read_text())
EOS = ByteTokenizer.eos_id


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
    return path


def records_of(path: Path) -> sources.DocumentSource:
    return sources.DocumentSource(sources.list_documents(str(path), "text"), "text")


def arithmetic(count: int, seed: int = 0) -> list[dict]:
    """Prompt/completion records of different lengths: sums of two numbers."""
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        a, b = rng.randrange(10 ** rng.randint(1, 6)), rng.randrange(100)
        records.append({"prompt": f"{a}+{b}=", "completion": str(a + b)})
    return records


def unpack(rows: list[dict]) -> list[dict]:
    """The examples in packed rows, segment by segment, and check each row's layout."""
    found = []
    for row in rows:
        segment_ids = row["segment_ids"]
        padding = segment_ids == 0
        assert not row["loss_mask"][padding].any()
        assert np.array_equal(padding, np.sort(padding))  # padding only at the end
        for segment in np.unique(segment_ids[~padding]):
            where = np.flatnonzero(segment_ids == segment)
            assert np.array_equal(where, np.arange(where[0], where[-1] + 1))  # one run per example
            assert np.array_equal(row["positions"][where], np.arange(len(where)))
            found.append({field: row[field][where] for field in ("tokens", "targets", "loss_mask")})
    return found


# ---------------------------------------------------------------------------------------------
# Examples and masks.


def test_a_prompt_completion_example_trains_on_the_completion_and_its_closing_eos():
    example = prompt_completion_example({"prompt": "2+3=", "completion": "5"}, ByteTokenizer())
    assert example["tokens"].tolist() == [EOS, *b"2+3=", *b"5"]
    assert example["targets"].tolist() == [*b"2+3=", *b"5", EOS]
    assert example["loss_mask"].tolist() == [0, 0, 0, 0, 1, 1]


@pytest.mark.parametrize("name", ["llama3", "qwen2"])
@pytest.mark.parametrize("conversation", ["system", "multi_turn", "unicode"])
def test_chat_ids_and_masks_equal_transformers(tmp_path, name, conversation):
    expected = EXPECTED[name][conversation]
    messages = expected["messages"]
    tokenizer_json = str(CHAT_FIXTURES / name / "tokenizer.json")
    tokenizer = load_tokenizer(tiny_config(tmp_path, f"data.tokenizer={tokenizer_json}").data)
    token_mask = np.asarray(expected["assistant_masks"])
    assert token_mask[0] == 0 and token_mask.sum() > 0
    for template_file, ids in ((None, expected["ids"]), ("generation.jinja", expected["generation_ids"])):
        # The model's own template (no generation blocks: turns found by rendering prefixes), and
        # the same template with {% generation %} blocks, whose mask transformers computes.
        overrides = [f"data.tokenizer={tokenizer_json}"]
        if template_file:
            overrides.append(f"data.chat_template={CHAT_FIXTURES / name / template_file}")
        template = load_chat_template(tiny_config(tmp_path, *overrides).data, tokenizer)
        assert template.has_generation_blocks == bool(template_file)
        assert template.render(messages) == expected["text"]
        example = chat_example({"messages": messages}, tokenizer, template)
        assert [*example["tokens"], example["targets"][-1]] == ids
        # Target i is token i + 1: trained where that token is the assistant's.
        np.testing.assert_array_equal(example["loss_mask"], token_mask[1:])


def test_the_built_in_template_marks_roles_starts_with_eos_and_ends_each_answer_with_it(tmp_path):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+3?"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "ünd 4?"},
        {"role": "assistant", "content": "9"},
    ]
    tokenizer = ByteTokenizer()
    template = load_chat_template(tiny_config(tmp_path).data, tokenizer)
    assert template.render(messages) == (
        "<|endoftext|><|system|>\nBe brief.\n<|user|>\n2+3?\n<|assistant|>\n5<|endoftext|>\n"
        "<|user|>\nünd 4?\n<|assistant|>\n9<|endoftext|>\n"
    )
    assert template.render(messages[:2], add_generation_prompt=True).endswith(
        "<|user|>\n2+3?\n<|assistant|>\n"
    )
    example = chat_example({"messages": messages}, tokenizer, template)
    ids = [*example["tokens"], example["targets"][-1]]
    assert ids[0] == EOS and ids.count(EOS) == 3
    trained = [target for target, mask in zip(example["targets"], example["loss_mask"], strict=True) if mask]
    assert trained == [ord("5"), EOS, ord("9"), EOS]


def test_tool_calls_are_the_assistants_and_tools_reach_the_template(tmp_path):
    weather = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}
    call = [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Zürich"}}}]
    messages = [
        {"role": "user", "content": "Weather in Zürich?"},
        {"role": "assistant", "content": None, "tool_calls": call},
        {"role": "tool", "content": "12 °C"},
        {"role": "assistant", "content": "12 °C."},
    ]
    data = write_jsonl(tmp_path / "tools.jsonl", [{"messages": messages, "tools": [weather]}])
    examples = pipeline.examples(records_of(data), tiny_config(tmp_path, "data.seq_len=256"), ByteTokenizer())
    example = examples[0]
    trained = bytes(t for t, m in zip(example["targets"], example["loss_mask"], strict=True) if m and t < 256)
    assert trained.decode() == json.dumps(call, ensure_ascii=False) + "12 °C."
    # A template sees `tools` (None when a chat offers none, as transformers passes it).
    template = tmp_path / "tools.jinja"
    template.write_text(
        "{% if tools is not none %}{{ tools | tojson }}{% endif %}"
        "{% for m in messages %}{% generation %}{{ m['content'] }}{% endgeneration %}{% endfor %}"
    )
    config = tiny_config(tmp_path, f"data.chat_template={template}")
    rendered = load_chat_template(config.data, ByteTokenizer())
    assert rendered.render(messages[-1:], tools=[weather]) == json.dumps([weather]) + "12 °C."
    assert rendered.render(messages[-1:]) == "12 °C."


def test_a_template_whose_turns_cannot_be_found_is_an_error_when_no_record_is_left(tmp_path, caplog):
    # The count of messages leads the rendering, so no prefix of a chat begins the whole chat.
    template = tmp_path / "counted.jinja"
    template.write_text("{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    chats = write_jsonl(
        tmp_path / "chats.jsonl",
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}] * 2,
    )
    config = tiny_config(tmp_path, f"data.chat_template={template}")
    with pytest.raises(
        DataError,
        match=r"none of the 2 chat .* left to train on: the chat template .* marks no .*chats.jsonl:1.*generation",
    ):
        pipeline.examples(records_of(chats), config, ByteTokenizer())


def test_the_tokenizers_own_template_is_found_beside_it_and_a_refused_chat_names_its_line(tmp_path):
    tokenizer_dir = tmp_path / "tokenizer"
    tokenizer_dir.mkdir()
    shutil.copy(CHAT_FIXTURES / "qwen2" / "tokenizer.json", tokenizer_dir)
    settings = json.loads((CHAT_FIXTURES / "qwen2" / "tokenizer_config.json").read_text())
    settings["chat_template"] = [
        {"name": "tool_use", "template": "unused"},
        {"name": "default", "template": "{{ raise_exception('only ' + eos_token) }}"},
    ]
    (tokenizer_dir / "tokenizer_config.json").write_text(json.dumps(settings))
    config = tiny_config(tmp_path, f"data.tokenizer={tokenizer_dir / 'tokenizer.json'}")
    chats = write_jsonl(tmp_path / "chats.jsonl", [{"messages": EXPECTED["qwen2"]["system"]["messages"]}])
    # The list's "default" is taken, with tokenizer_config.json's special tokens as variables.
    with pytest.raises(
        DataError, match=r"chats.jsonl:1: the chat template .* refuses this chat \(only <\|endoftext\|>\)"
    ):
        pipeline.examples(records_of(chats), config, load_tokenizer(config.data))
    # chat_template.jinja beside the tokenizer comes first, as transformers saves templates now.
    (tokenizer_dir / "chat_template.jinja").write_text(settings_template := "{{ messages[0]['content'] }}")
    template = load_chat_template(config.data, load_tokenizer(config.data))
    assert template.source == settings_template
    missing = tiny_config(tmp_path, f"data.chat_template={tmp_path / 'missing.jinja'}")
    with pytest.raises(DataError, match=r"data.chat_template=.*missing.jinja is not a file"):
        load_chat_template(missing.data, ByteTokenizer())


def test_a_mixture_packs_text_and_instructions_each_their_own_way(tmp_path):
    (tmp_path / "text").mkdir()
    for i in range(8):
        (tmp_path / "text" / f"{i}.txt").write_text("words " * (20 + 9 * i))
    sums = write_jsonl(tmp_path / "sums.jsonl", arithmetic(30))
    mixture = f"[{{path: {tmp_path / 'text'}, weight: 1}}, {{path: {sums}, weight: 1}}]"
    config = tiny_config(tmp_path, f"data.mixture={mixture}", "data.validation_fraction=0")
    batches = pipeline.HostBatches(sources.corpus(config.data), config, ByteTokenizer())
    taken = [next(batches) for _ in range(4)]
    batch = {field: np.concatenate([b[field] for b in taken]) for field in (*pipeline.FIELDS, "source")}
    text_rows, instruction_rows = batch["source"] == 0, batch["source"] == 1
    assert text_rows.any() and instruction_rows.any()
    assert batch["loss_mask"][text_rows].all() and (batch["segment_ids"][text_rows] > 0).all()
    assert not batch["loss_mask"][instruction_rows].all()  # prompts and padding are not trained on
    seen = batches.counts.seen()
    assert 0 < seen["padding_fraction"] < 1 and seen["documents_seen/" + str(sums)] > 0
    batches.close()


# ---------------------------------------------------------------------------------------------
# Reports of records left out.


def test_records_with_nothing_to_train_on_are_left_out_and_named_in_one_line(tmp_path, caplog):
    records = arithmetic(6)
    records[2]["completion"] = ""
    records[4]["completion"] = "  "
    data = write_jsonl(tmp_path / "sums.jsonl", records)
    with caplog.at_level(logging.WARNING, logger="jaxlm"):
        examples = pipeline.examples(records_of(data), tiny_config(tmp_path), ByteTokenizer())
    assert len(examples) == 4
    lines = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert (
        len(lines) == 1
        and lines[0].startswith("2 of the 6 prompt/completion records")
        and "sums.jsonl:3" in lines[0]
    )
    for record in records:
        record["completion"] = ""
    write_jsonl(data, records)
    with pytest.raises(
        DataError,
        match=r"none of the 6 prompt/completion records .* is left to train on: they train on no token",
    ):
        pipeline.examples(records_of(data), tiny_config(tmp_path), ByteTokenizer())


@pytest.mark.parametrize("policy", ["truncate", "drop"])
def test_records_longer_than_seq_len_are_truncated_or_dropped_and_counted(tmp_path, caplog, policy):
    records = arithmetic(5)
    records[1] = {"prompt": "p" * 20, "completion": "c" * 30}  # 52 tokens: its answer outlives the cut
    records[3] = {"prompt": "p" * 40, "completion": "c"}  # 42 tokens, its answer cut away
    data = write_jsonl(tmp_path / "long.jsonl", records)
    config = tiny_config(tmp_path, "data.seq_len=32", f"data.too_long={policy}")
    with caplog.at_level(logging.WARNING, logger="jaxlm"):
        examples = pipeline.examples(records_of(data), config, ByteTokenizer())
    lines = [r.getMessage() for r in caplog.records if "longer than data.seq_len=32" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("2 of the 5") and "long.jsonl:2 (51 tokens)" in lines[0]
    if policy == "drop":
        assert len(examples) == 3 and "and left out (data.too_long=drop)" in lines[0]
        write_jsonl(data, [records[1], records[3]])
        with pytest.raises(
            DataError, match=r"none of the 2 .* raise data.seq_len, or set data.too_long=truncate"
        ):
            pipeline.examples(records_of(data), config, ByteTokenizer())
    else:
        assert len(examples) == 4  # the one with no answer left is reported as empty
        assert [len(examples[i]["tokens"]) for i in range(4)][1] == 32
        assert any(
            "long.jsonl:4" in r.getMessage() for r in caplog.records if "train on no token" in r.getMessage()
        )


def test_a_batch_with_nothing_to_train_on_is_said_once_and_counted(tmp_path, caplog):
    data = write_jsonl(tmp_path / "sums.jsonl", arithmetic(4))
    counts = DataCounts(pipeline.examples(records_of(data), tiny_config(tmp_path), ByteTokenizer()), EOS)
    row = np.ones((2, 8), np.int32)
    batch = {"tokens": row, "positions": row, "segment_ids": row, "source": np.zeros(2, np.int32)}
    with caplog.at_level(logging.WARNING, logger="jaxlm"):
        for _ in range(3):
            counts.add({**batch, "loss_mask": 0 * row})
        counts.add({**batch, "loss_mask": row})
    lines = [r.getMessage() for r in caplog.records if "no target to train on" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("batch 1 of this process")
    assert counts.seen()["untrained_batches"] == 3


# ---------------------------------------------------------------------------------------------
# Packing.


def test_packing_keeps_examples_whole_with_their_own_segments_and_counts_padding(tmp_path):
    records = arithmetic(40)
    data = write_jsonl(tmp_path / "sums.jsonl", records)
    config = tiny_config(tmp_path, "data.validation_fraction=0", "data.packing_bins=4")
    batches = pipeline.HostBatches(records_of(data), config, ByteTokenizer())
    rows = [dict(zip(pipeline.FIELDS, values, strict=True)) for batch in [next(batches) for _ in range(3)]
            for values in zip(*(batch[field] for field in pipeline.FIELDS), strict=True)]  # fmt: skip
    found = unpack(rows)
    whole = {tuple(prompt_completion_example(r, ByteTokenizer())["tokens"]) for r in records}
    assert all(tuple(example["tokens"]) in whole for example in found)  # never a piece of one
    seen = batches.counts.seen()
    padding = sum(int(np.count_nonzero(row["segment_ids"] == 0)) for row in rows)
    assert seen["padding_fraction"] == pytest.approx(padding / (len(rows) * 32)) and padding > 0
    assert seen["documents_seen"] == len(found) and seen["tokens_seen"] == sum(
        r["loss_mask"].sum() for r in rows
    )
    # Attention stays within an example; padding attends to nothing of an example.
    row = rows[0]
    mask = np.asarray(attention_mask(row["segment_ids"][None]))[0, 0]
    same = row["segment_ids"][:, None] == row["segment_ids"][None, :]
    assert not mask[~same].any()
    batches.close()


def test_the_packed_position_restores_exactly_also_from_another_process_layout(tmp_path):
    data = write_jsonl(tmp_path / "sums.jsonl", arithmetic(50))
    config = tiny_config(tmp_path, "data.validation_fraction=0", "data.packing_bins=3")
    first = pipeline.HostBatches(records_of(data), config, ByteTokenizer())
    [next(first) for _ in range(5)]
    position = first.position()
    expected = [next(first) for _ in range(4)]
    first.close()
    # As if two processes had saved it: streams 0-3 and 4-7.
    halves = [
        {**position, "streams": {k: v for k, v in position["streams"].items() if int(k) < 4}},
        {**position, "streams": {k: v for k, v in position["streams"].items() if int(k) >= 4}, "seen": {}},
    ]
    resumed = pipeline.HostBatches(records_of(data), config, ByteTokenizer())
    resumed.restore_position(json.loads(json.dumps(halves)))  # it goes through a JSON file
    for batch in expected:
        again = next(resumed)
        for field in pipeline.FIELDS:
            np.testing.assert_array_equal(batch[field], again[field])
    resumed.close()


def test_evaluation_rows_hold_every_example_once_in_order(tmp_path):
    records = arithmetic(9)
    records[4]["completion"] = ""  # left out, reported
    data = write_jsonl(tmp_path / "sums.jsonl", records)
    rows = list(pipeline.evaluation_rows(records_of(data), tiny_config(tmp_path), ByteTokenizer()))
    kept = [r for r in records if r["completion"]]
    examples = [prompt_completion_example(r, ByteTokenizer()) for r in kept]
    found = unpack(rows)
    assert [e["tokens"].tolist() for e in found] == [e["tokens"].tolist() for e in examples]
    assert all(
        row[field].dtype == np.int32 and row[field].shape == (32,)
        for row in rows
        for field in pipeline.FIELDS
    )
    # Chats come through with transformers' ids and masks.
    chats = write_jsonl(
        tmp_path / "chats.jsonl", [{"messages": c["messages"]} for c in EXPECTED["qwen2"].values()]
    )
    tokenizer_json = CHAT_FIXTURES / "qwen2" / "tokenizer.json"
    config = tiny_config(tmp_path, f"data.tokenizer={tokenizer_json}", "data.seq_len=128")
    rows = list(pipeline.evaluation_rows(records_of(chats), config, load_tokenizer(config.data)))
    for example, expected in zip(unpack(rows), EXPECTED["qwen2"].values(), strict=True):
        assert [*example["tokens"], example["targets"][-1]] == expected["ids"]
        assert example["loss_mask"].tolist() == expected["assistant_masks"][1:]
    # A text document longer than a row is cut into consecutive rows.
    text = tmp_path / "text.txt"
    text.write_text("abcdefghij" * 7)
    rows = list(pipeline.evaluation_rows(records_of(text), tiny_config(tmp_path), ByteTokenizer()))
    assert [int(row["loss_mask"].sum()) for row in rows] == [32, 32, 7]
    assert np.concatenate([row["tokens"][row["segment_ids"] > 0] for row in rows]).tolist() == [
        EOS, *("abcdefghij" * 7).encode()
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Bad input: one line each.


def test_mixed_kinds_in_a_file_are_one_line_naming_the_line(tmp_path):
    data = write_jsonl(tmp_path / "mixed.jsonl", [*arithmetic(2), {"text": "plain"}])
    with pytest.raises(
        DataError, match=r"mixed.jsonl:3 is one of the text documents but .*mixed.jsonl:1 is one of"
    ):
        sources.list_documents(str(data), "text")
    (tmp_path / "other.txt").write_text("plain")
    write_jsonl(data, arithmetic(2))
    with pytest.raises(
        DataError, match=r"holds prompt/completion records \(mixed.jsonl:1\) and text documents"
    ):
        sources.list_documents(str(tmp_path), "text")


def test_jaxlm_prepare_refuses_instruction_records(tmp_path):
    data = write_jsonl(tmp_path / "sums.jsonl", arithmetic(3))
    config = tiny_config(tmp_path, f"data.path={data}").data
    with pytest.raises(DataError, match=r"holds prompt/completion records: jaxlm prepare tokenizes text"):
        prepare.prepare(config, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


GOOD_CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@pytest.mark.parametrize(
    ("records", "expected"),
    [
        (
            [{"messages": [{"role": "bot", "content": "hi"}]}],
            "chats.jsonl:1: message 1 has role 'bot'; use one of",
        ),
        (
            [{"messages": [{"role": "user", "content": "hi"}]}],
            "chats.jsonl:1 has no assistant message, so nothing",
        ),
        ([{"messages": "hi"}], "chats.jsonl:1: 'messages' must be a list of"),
        ([GOOD_CHAT, *arithmetic(1)], "chats.jsonl:2 is one of the prompt/completion records but"),
        # Checked before anything compiles.
        ([{"prompt": "2+2=", "completion": ""}] * 2, "is left to train on: they train on no token"),
    ],
    ids=["unknown role", "no assistant", "not a list", "mixed kinds", "all empty"],
)
def test_bad_instruction_records_are_one_line_and_exit_2_from_the_cli(tmp_path, records, expected):
    data = write_jsonl(tmp_path / "chats.jsonl", records)
    result = jaxlm("train", "configs/tiny.yaml", f"data.path={data}", f"run.dir={tmp_path / 'run'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and expected in errors[0], result.stderr


# ---------------------------------------------------------------------------------------------
# Training.

RUN = [
    "train.steps=6",
    "checkpoint.every=3",
    "optim.schedule_steps=6",
    "data.validation_fraction=0.1",
    "train.eval_every=3",
    "data.packing_bins=4",
]


@pytest.fixture(scope="module")
def sums(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("sums") / "sums.jsonl", arithmetic(120))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, sums) -> Path:
    run_dir = tmp_path_factory.mktemp("sft")
    train(tiny_config(run_dir, *RUN, f"data.path={sums}"))
    return run_dir


def test_fine_tuning_trains_on_the_completion_tokens_of_its_batches(tmp_path, sums, uninterrupted):
    config = tiny_config(uninterrupted, *RUN, f"data.path={sums}")
    corpus = sources.corpus(config.data)
    batches = pipeline.HostBatches(corpus, config, ByteTokenizer())
    completion_tokens = [int(next(batches)["loss_mask"].sum()) for _ in range(6)]
    batches.close()
    records = [r for r in read_metrics(uninterrupted) if "loss" in r]
    assert [r["trained_tokens"] for r in records] == completion_tokens
    # Only completions (and their closing EOS) count: far fewer than the example tokens.
    assert all(0 < tokens < 8 * 32 / 2 for tokens in completion_tokens)
    assert 0 < records[-1]["padding_fraction"] < 0.5
    assert any("eval_loss" in r for r in read_metrics(uninterrupted))


def test_fine_tuning_resumes_with_the_losses_of_an_uninterrupted_run(tmp_path, sums, uninterrupted):
    # Resume from the uninterrupted run's step-3 checkpoint (model, optimizer and data position).
    shutil.copytree(uninterrupted / "checkpoints" / "3", tmp_path / "checkpoints" / "3")
    assert train(tiny_config(tmp_path, *RUN, f"data.path={sums}", "train.eval_every=0")).step == 6
    expected, resumed = train_losses(uninterrupted), train_losses(tmp_path)
    assert resumed.keys() == {4, 5, 6}
    for step in resumed:
        assert abs(resumed[step] - expected[step]) <= 1e-6, (step, resumed[step], expected[step])
