"""Generation equals transformers': jaxlm's greedy continuation of each committed tiny Hugging Face
model (tests/fixtures/hf, made by make_fixtures.py) is transformers' `generate(do_sample=False)`,
for one prompt and for a batch of prompts of different lengths; a prompt's text is encoded as
transformers encodes it."""

import dataclasses

import jax
import numpy as np
import pytest
from conftest import REPO

import jaxlm
from jaxlm.inference import generation

FIXTURES = REPO / "tests/fixtures/hf"
MODELS = ["llama2", "llama3", "llama3_1", "llama3_2", "qwen2"]


@pytest.mark.parametrize("name", MODELS)
def test_greedy_continuations_are_transformers(name):
    reference = np.load(FIXTURES / f"{name}.reference.npz")
    # The references run past end-of-sequence tokens: no stopping here either.
    loaded = dataclasses.replace(jaxlm.load(FIXTURES / name, devices=jax.devices()[:1]), eos_ids=())
    assert (
        loaded.tokenizer.encode_prompt(str(reference["prompt_text"])).tolist()
        == reference["prompt_text_ids"].tolist()
    )
    (one,) = generation.complete(
        loaded, [reference["greedy_prompt_ids"].tolist()], max_new_tokens=32, greedy=True
    )
    assert one.token_ids == reference["greedy_ids"].tolist()
    prompts = [reference[f"batch_prompt_{i}"].tolist() for i in range(3)]
    assert len({len(prompt) for prompt in prompts}) == 3
    batch = generation.complete(loaded, prompts, max_new_tokens=16, greedy=True)
    assert [c.token_ids for c in batch] == [reference[f"batch_greedy_{i}"].tolist() for i in range(3)]


@pytest.mark.parametrize("name", MODELS)
def test_text_streamed_token_by_token_is_the_text_decoded_at_once(name):
    # Multi-byte characters split over byte-level tokens, and word-initial spaces, come out whole.
    from jaxlm.data.tokenizers import HuggingFaceTokenizer
    from jaxlm.inference.text_stream import RowText

    reference = np.load(FIXTURES / f"{name}.reference.npz")
    tokenizer = HuggingFaceTokenizer(str(FIXTURES / name / "tokenizer.json"), None)
    ids = reference["mixed_text_ids"].tolist()
    row = RowText(tokenizer, eos_ids=())
    pieces = []
    for index, token in enumerate(ids):
        row.add(token, 0.0, last=index == len(ids) - 1)
        pieces.append(row.take_final_text())
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == tokenizer.decode(ids)
    assert "naïve café, 你好" in "".join(pieces)


def test_cli_continues_a_prompt_with_a_hugging_face_model_as_the_python_api_does():
    from test_generate import jaxlm_generate

    result = jaxlm_generate(
        str(FIXTURES / "llama3"), "--prompt", "def f(x):", "--max-new-tokens", "12", "--greedy"
    )
    assert result.returncode == 0, result.stderr
    loaded = jaxlm.load(FIXTURES / "llama3", devices=jax.devices()[:2])
    (text,) = jaxlm.generate(loaded, "def f(x):", max_new_tokens=12, greedy=True)
    assert text and result.stdout == text + "\n"


@pytest.mark.multiprocess
def test_two_processes_draw_the_tokens_of_one_device(tmp_path):
    # A model sharded over the devices of two processes (its rows and weights split across them):
    # each process holds every prompt and reads every token; process 0 prints the completions.
    import json

    from test_multihost import run_processes

    prompts = ["def f(x):", "import numpy as np\nimport", "The quick brown fox jumps over"]
    prompt_file = tmp_path / "prompts.jsonl"
    prompt_file.write_text("".join(json.dumps({"prompt": prompt}) + "\n" for prompt in prompts))
    (out, err), (other_out, _) = run_processes(
        [
            "generate",
            str(FIXTURES / "llama3"),
            "--prompt-file",
            str(prompt_file),
            "--greedy",
            "--max-new-tokens",
            "12",
        ]
    )
    assert "process 0 of 2" in err, err
    # Gloo, the CPU collectives of these tests (not a TPU's or GPU's), prints to stdout as it
    # connects, before any completion, its threads' lines sometimes run together.
    assert '"completion"' not in other_out
    out = "".join(line for line in out.splitlines(True) if line.startswith("{"))
    loaded = jaxlm.load(FIXTURES / "llama3", devices=jax.devices()[:1])
    expected = jaxlm.generate(loaded, prompts, max_new_tokens=12, greedy=True)
    assert [json.loads(line) for line in out.splitlines()] == [
        {"prompt": prompt, "completion": text} for prompt, text in zip(prompts, expected, strict=True)
    ]
