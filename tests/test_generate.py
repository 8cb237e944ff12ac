"""Generation: the cached decode draws what recomputing the whole sequence would; a batch of
prompts of different lengths continues each as it would alone; one compilation whatever the
number of tokens; seeded sampling, top-k and top-p; end-of-sequence tokens and stop strings; a
sharded cache; text streamed without broken characters; the CLI and its one-line errors."""

import dataclasses
import json
import os
import subprocess
import sys
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, tiny_config
from jax.sharding import NamedSharding, PartitionSpec

from jaxlm.data.tokenizers import ByteTokenizer
from jaxlm.inference import generation
from jaxlm.inference.loading import Loaded
from jaxlm.inference.text_stream import RowText
from jaxlm.training.setup import build_model

PROMPTS = ["def main():", "import os", "x = [i * 2 for i in range(10)]\n"]
CONTEXT = ["data.seq_len=64"]


def tiny_loaded(*overrides: str, devices=None) -> Loaded:
    """The untrained tiny model with the byte tokenizer and no end-of-sequence token: every row
    runs to its max_new_tokens."""
    config = tiny_config("unused", *CONTEXT, "train.global_batch_size=8", *overrides)
    setup = build_model(config, devices or jax.devices()[:1])
    params = setup.init_params(jax.random.key(0))
    tokenizer = ByteTokenizer()
    return Loaded(config, setup, params, tokenizer, eos_ids=())


@pytest.fixture(scope="module")
def loaded() -> Loaded:
    return tiny_loaded("mesh.fsdp=1")


@pytest.fixture(scope="module")
def greedy(loaded) -> list[generation.Completion]:
    return generation.complete(loaded, PROMPTS, max_new_tokens=12, greedy=True)


def recomputed_greedy(
    loaded: Loaded, prompt_ids: list[int], new_tokens: int
) -> tuple[list[int], list[float]]:
    """Greedy decoding the slow way: each token from a forward pass over the whole sequence, with
    no cache (in a row of the context's length: causal attention never looks past the end)."""
    length = loaded.config.data.seq_len
    forward = jax.jit(
        lambda params, tokens: loaded.model()(tokens, jnp.arange(length)[None], jnp.ones_like(tokens)).logits
    )
    ids, logprobs = list(prompt_ids), []
    for _ in range(new_tokens):
        tokens = jnp.array([ids + [0] * (length - len(ids))])
        last = jax.nn.log_softmax(
            forward(loaded.params, tokens)[0, len(ids) - 1, : loaded.tokenizer.vocab_size]
        )
        ids.append(int(jnp.argmax(last)))
        logprobs.append(float(last[ids[-1]]))
    return ids[len(prompt_ids) :], logprobs


def test_cached_decoding_draws_what_recomputing_the_whole_sequence_draws(loaded, greedy):
    for completion in greedy:
        token_ids, logprobs = recomputed_greedy(loaded, completion.prompt_ids, 12)
        assert completion.token_ids == token_ids
        np.testing.assert_allclose(completion.logprobs, logprobs, rtol=1e-5, atol=1e-5)
        assert completion.finish_reason == "length"


def test_each_prompt_of_a_batch_continues_as_it_would_alone(loaded, greedy):
    for prompt, together in zip(PROMPTS, greedy, strict=True):
        (alone,) = generation.complete(loaded, prompt, max_new_tokens=12, greedy=True)
        assert alone.token_ids == together.token_ids
    # A prompt given as its token ids continues as its text does.
    (from_ids,) = generation.complete(loaded, greedy[0].prompt_ids, max_new_tokens=12, greedy=True)
    assert from_ids.token_ids == greedy[0].token_ids
    # Batches of 2 then 1 prompt, padded to the data-parallel rows, give the same again.
    in_twos = generation.complete(loaded, PROMPTS, max_new_tokens=12, greedy=True, batch_size=2)
    assert [c.token_ids for c in in_twos] == [c.token_ids for c in greedy]


def test_decoding_compiles_once_whatever_the_number_of_tokens(loaded):
    compiled = Counter()

    def count(event: str, _seconds: float, **labels) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiled[labels.get("fun_name")] += 1

    jax.monitoring.register_event_duration_secs_listener(count)
    try:
        # top_k=3 appears in no other test: these are the first compilations of its program.
        generation.complete(loaded, PROMPTS[:2], max_new_tokens=20, top_k=3, seed=1)
        first = dict(compiled)
        # Another prompt length in the same bucket of 16, another number of tokens in the same
        # cache length: nothing new to compile.
        generation.complete(loaded, ["print(1)", "pass"], max_new_tokens=18, top_k=3, seed=2)
    finally:
        jax.monitoring.unregister_event_duration_listener(count)
    assert first["jit(_prefill)"] == 1 and first["jit(_decode_step)"] == 1
    assert compiled["jit(_prefill)"] == 1 and compiled["jit(_decode_step)"] == 1


def test_the_same_seed_draws_the_same_text_whatever_the_batch_size_and_another_seed_another(loaded):
    # Each prompt has its own random stream (the seed's, folded with its place in the list).
    def sample(seed: int, batch_size: int = 8) -> list[list[int]]:
        completions = generation.complete(
            loaded, PROMPTS, max_new_tokens=12, temperature=1.0, seed=seed, batch_size=batch_size
        )
        return [c.token_ids for c in completions]

    assert sample(7) == sample(7, batch_size=1)
    assert sample(7) != sample(8)


def test_top_k_of_one_draws_the_greedy_tokens(loaded, greedy):
    completions = generation.complete(loaded, PROMPTS, max_new_tokens=12, temperature=0.7, top_k=1, seed=3)
    assert [c.token_ids for c in completions] == [c.token_ids for c in greedy]


@pytest.mark.parametrize(
    ("sampling", "allowed"),
    [
        (generation.Sampling(temperature=1.0), {0, 1, 2, 3}),
        (generation.Sampling(temperature=1.0, top_k=2), {0, 1}),
        (generation.Sampling(temperature=1.0, top_p=0.75), {0, 1}),  # 0.5 + 0.3 reach 0.75
        (generation.Sampling(temperature=1.0, top_p=0.5), {0}),
        (generation.Sampling(temperature=0.0), {0}),
    ],
)
def test_sampling_draws_only_from_the_tokens_it_keeps(sampling, allowed):
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 2000)
    drawn = jax.vmap(lambda key: generation.draw(logits, key[None], sampling)[0])(keys)
    assert set(np.asarray(drawn).tolist()) == allowed


def test_a_row_ends_at_an_end_of_sequence_token(loaded, greedy):
    ids = greedy[0].token_ids
    stop_at = next(i for i in range(2, len(ids)) if ids[i] not in ids[:i])
    ends = dataclasses.replace(loaded, eos_ids=(999, ids[stop_at]))
    (completion,) = generation.complete(ends, PROMPTS[:1], max_new_tokens=12, greedy=True)
    assert completion.token_ids == ids[:stop_at]
    assert completion.finish_reason == "eos"
    assert completion.text == ByteTokenizer().decode(ids[:stop_at])


def test_a_stop_string_ends_the_text_before_it_and_is_never_streamed(loaded, greedy):
    # Two characters of a greedy text that appear there first at k > 0 (the untrained model
    # writes many bytes that are no UTF-8 text: U+FFFD, which would make a poor stop string).
    row, k = next(
        (row, k)
        for row, completion in enumerate(greedy)
        for k in range(1, len(completion.text) - 1)
        if "\ufffd" not in (pair := completion.text[k : k + 2]) and completion.text.find(pair) == k
    )
    text = greedy[row].text
    streamed = []
    (completion,) = generation.complete(
        loaded, [PROMPTS[row]], max_new_tokens=12, greedy=True, stop=["never there", text[k : k + 2]],
        on_text=lambda index, piece: streamed.append((index, piece)),
    )  # fmt: skip
    assert completion.text == text[:k]
    assert completion.finish_reason == "stop"
    assert "".join(piece for _, piece in streamed) == text[:k]
    assert {index for index, _ in streamed} == {0}


def test_streamed_text_never_splits_a_character_and_holds_back_a_stop_string():
    tokenizer = ByteTokenizer()
    text = "héllo wörld ✓ — done"
    row = RowText(tokenizer, [tokenizer.eos_id], stop=["— d"])
    pieces = []
    for byte in tokenizer.encode(text):
        row.add(int(byte), 0.0)
        pieces.append(row.take_final_text())
        if row.finish_reason:
            break
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == row.text == "héllo wörld ✓ "
    assert row.finish_reason == "stop"


def test_a_sharded_cache_draws_the_tokens_of_one_device(loaded, greedy):
    sharded = tiny_loaded("mesh.tensor=2", "mesh.fsdp=4", devices=jax.devices())
    params = jax.device_put(loaded.params, sharded.setup.param_shardings)
    sharded = dataclasses.replace(sharded, params=params)
    completions = generation.complete(sharded, PROMPTS, max_new_tokens=12, greedy=True)
    assert [c.token_ids for c in completions] == [c.token_ids for c in greedy]
    for one, other in zip(completions, greedy, strict=True):
        np.testing.assert_allclose(one.logprobs, other.logprobs, rtol=1e-5, atol=1e-5)
    # The cache is sharded as the model is: rows over fsdp (and data), kv heads over tensor.
    program = generation.program_of(sharded, generation.Sampling(0.0))
    tokens, positions, segment_ids = generation.left_pad([np.array([256, 1, 2])], rows=4)
    state, _ = generation._prefill(
        sharded.params, tokens, positions, segment_ids, jax.random.key(0), 0, program=program, cache_length=32
    )
    expected = NamedSharding(sharded.setup.mesh, PartitionSpec(None, ("data", "fsdp"), "tensor", None, None))
    assert state.cache.keys.sharding.is_equivalent_to(expected, 5)


def jaxlm_generate(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    return subprocess.run(
        [sys.executable, "-m", "jaxlm.cli", "generate", *args],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
    )  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny run trained for 2 steps, with its checkpoint."""
    from jaxlm.training.train import train

    path = tmp_path_factory.mktemp("run")
    train(tiny_config(path, *CONTEXT, "train.steps=2", "checkpoint.every=2", "mesh.fsdp=8"))
    return path


def test_cli_streams_one_prompt_and_writes_a_json_line_per_prompt_of_a_file(run_dir, tmp_path):
    one = jaxlm_generate(str(run_dir), "--prompt", "def f(x):", "--max-new-tokens", "8", "--greedy")
    assert one.returncode == 0, one.stderr
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["def f(x):", "import os"]))
    many = jaxlm_generate(str(run_dir), "--prompt-file", str(prompts), "--max-new-tokens", "8", "--greedy")
    assert many.returncode == 0, many.stderr
    lines = [json.loads(line) for line in many.stdout.splitlines()]
    assert [line["prompt"] for line in lines] == ["def f(x):", "import os"]
    assert one.stdout == lines[0]["completion"] + "\n"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--prompt", ""], "--prompt is empty; give it some text to continue"),
        (
            ["--prompt", "x" * 60, "--max-new-tokens", "8"],
            "--prompt has 61 tokens, which with max_new_tokens=8",
        ),
        (
            ["--prompt", "x" * 70],
            "--prompt has 71 tokens, which with max_new_tokens=64 exceed the model's context of 64",
        ),
    ],
)
def test_cli_refuses_bad_prompts_in_one_line(run_dir, args, expected):
    result = jaxlm_generate(str(run_dir), *args)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("jaxlm[p0]: error: " + expected)


def test_cli_refuses_a_run_directory_without_checkpoints(tmp_path):
    (tmp_path / "config.yaml").write_text(tiny_config(tmp_path).to_yaml())
    result = jaxlm_generate(str(tmp_path), "--prompt", "hello")
    assert result.returncode == 2
    assert f"error: {tmp_path} has no checkpoints" in result.stderr.strip().splitlines()[-1]
