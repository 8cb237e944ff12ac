"""Text generation: the prompts fill a KV cache in one prefill, then a jitted decode step draws a
token per row at a time; the host turns the tokens into text, streams it, and stops each row at
an end-of-sequence token, a stop string or `max_new_tokens`.

The loop is a jitted step per token called from Python, not one `lax.while_loop`: the host has to
see every token as it comes, to stream it and to stop a row at a stop string (text, not ids), and
a `while_loop` would need host callbacks for both. The loop dispatches step t+1 before it reads
token t, so the device does not wait on the host; the step's state (cache, last tokens, positions,
key) is donated to the next one, and the step compiles once per batch shape, whatever the number
of tokens. Both jitted functions are module-level with their static settings in `_Program`, so
calls with the same model, sampling and (bucketed) shapes reuse one compilation.

Prompts of different lengths are left-padded to one length with segment id 0, which no prompt
token (segment 1) attends to: every row's last prompt token is in the same slot, so one prefill
gives every row's first token, and every decode step writes the same cache slot in all rows.
Positions count from each row's first real token, so a row computes what it would alone.

The forward is the model's own (the one training runs), with its cache; the cache is sharded by
its `logical_axes()` through `mesh.rules`, like the model: kv heads over `tensor`, rows over
`data` × `fsdp` (the batch is padded to a multiple of those).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlm import parallel
from jaxlm.errors import UserError
from jaxlm.inference.text_stream import RowText
from jaxlm.model import registry
from jaxlm.model.lora import LoRASpec

if TYPE_CHECKING:
    from jaxlm.hf.files import SamplingDefaults
    from jaxlm.inference.loading import Loaded

Prompt = str | Sequence[int]  # text, or token ids to continue as they are

# Prompt and cache lengths are rounded up to a multiple of this, so prompts of nearby lengths and
# nearby max_new_tokens share one compilation.
LENGTH_QUANTUM = 16


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is drawn from the logits: temperature 0 is greedy (the most likely
    token); otherwise the logits are divided by the temperature, cut to the `top_k` most likely
    tokens (0: all), then to the fewest whose probabilities add up to `top_p`, and sampled."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    @classmethod
    def chosen(
        cls,
        defaults: SamplingDefaults,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        greedy: bool | None = None,
    ) -> Sampling:
        """What the caller sets (None: not set), else the model's `defaults` (its
        generation_config.json's), else jaxlm's: sampling at temperature 1 from every token. A
        model whose defaults say do_sample false is greedy unless the caller asks for sampling
        (greedy=False, or a temperature, top_k or top_p of its own)."""
        given = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
        if greedy is None:
            greedy = defaults.do_sample is False and all(value is None for value in given.values())
        chosen = {key: getattr(defaults, key) if value is None else value for key, value in given.items()}
        sampling = cls(**{key: value for key, value in chosen.items() if value is not None})
        return dataclasses.replace(sampling, temperature=0.0) if greedy else sampling

    def check(self) -> None:
        if not self.temperature >= 0:
            raise UserError(f"temperature={self.temperature} must be ≥ 0 (0 is greedy)")
        if self.top_k < 0:
            raise UserError(f"top_k={self.top_k} must be ≥ 0 (0 keeps every token)")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p={self.top_p} must be in (0, 1] (1 keeps every token)")


@dataclasses.dataclass
class Completion:
    """What one prompt became. `token_ids` are the drawn tokens (an end-of-sequence token left
    out; with a stop string, up to the token that completed it), `logprobs` the model's log
    probability of each (before temperature and cuts), `text` their text cut before the stop
    string; `finish_reason` is "eos", "stop" or "length"."""

    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str


@flax.struct.dataclass
class DecodeState:
    """What one decode step hands the next (donated)."""

    cache: Any  # the model family's cache
    tokens: jax.Array  # [batch] int32: the last tokens drawn, the step's input
    positions: jax.Array  # [batch] int32: their positions in their sequences
    key: jax.Array  # [batch] PRNG keys, each row's (its prompt's); draw n uses fold_in(key, n)
    drawn: jax.Array  # int32 scalar: tokens drawn per row so far


@dataclasses.dataclass(frozen=True)
class _Program:
    """Everything static about a prefill and a decode step: the jit cache's key."""

    graphdef: nnx.GraphDef
    mesh: Mesh
    rules: tuple[tuple[str, tuple[str, ...] | None], ...]
    sampling: Sampling
    vocab_size: int  # the tokenizer's: larger ids of a padded embedding table are never drawn


def generate(loaded: Loaded, prompts: Prompt | Sequence[Prompt], **options) -> list[str]:
    """The text each prompt continues with. `options` are `iter_completions`'."""
    return [completion.text for completion in complete(loaded, prompts, **options)]


def complete(loaded: Loaded, prompts: Prompt | Sequence[Prompt], **options) -> list[Completion]:
    """Each prompt's `Completion`: its text, token ids and their log probabilities. `options` are
    `iter_completions`'."""
    return list(iter_completions(loaded, prompts, **options))


def iter_completions(
    loaded: Loaded,
    prompts: Prompt | Sequence[Prompt],
    *,
    max_new_tokens: int = 64,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool | None = None,
    seed: int = 0,
    stop: Sequence[str] = (),
    batch_size: int = 8,
    on_text: Callable[[int, str], None] | None = None,
    names: Sequence[str] | None = None,
) -> Iterator[Completion]:
    """Continue each prompt (text, or token ids) with a `jaxlm.load`ed model, `batch_size`
    prompts at a time, yielding their completions in order as each batch finishes. The same seed
    gives the same text.

    temperature, top_k, top_p, greedy: how tokens are drawn (`Sampling`); None: as the model's
        generation_config.json says, else jaxlm's default (`Sampling.chosen`).
    on_text(prompt index, text): called with each piece of text as soon as it is final.
    names: what error messages call the prompts (default "prompt 1", "prompt 2", ...)."""
    one = isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], int | np.integer))
    prompts = [prompts] if one else list(prompts)
    sampling = Sampling.chosen(loaded.sampling, temperature, top_k, top_p, greedy)
    sampling.check()
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens={max_new_tokens} must be at least 1")
    if batch_size < 1:
        raise UserError(f"batch_size={batch_size} must be at least 1")
    names = list(names) if names is not None else [f"prompt {i + 1}" for i in range(len(prompts))]
    prompt_ids = encode_prompts(loaded, prompts, names, max_new_tokens)
    program = program_of(loaded, sampling)
    for first in range(0, len(prompts), batch_size):
        batch = prompt_ids[first : first + batch_size]
        rows = [RowText(loaded.tokenizer, loaded.eos_ids, stop) for _ in batch]
        stream = None if on_text is None else functools.partial(_stream, on_text, first)
        # Prompt i draws from fold_in(key(seed), i): its text depends on the seed and its place
        # in the list, never on batch_size or the other prompts.
        keys = (jax.random.key(seed), np.int32(first))
        _decode_batch(
            program, loaded.params, loaded.setup.batch_sharding, batch, rows, max_new_tokens, keys, stream
        )
        for ids, row in zip(batch, rows, strict=True):
            yield Completion(ids.tolist(), row.token_ids, row.logprobs, row.text, row.finish_reason)


def program_of(loaded: Loaded, sampling: Sampling) -> _Program:
    setup = loaded.setup
    model_config = setup.model_config
    return _Program(
        graphdef=_scanned_graphdef(model_config.family, model_config.model_dump_json(), setup.lora),
        mesh=setup.mesh,
        rules=tuple((name, tuple(axes) if axes else None) for name, axes in setup.rules.items()),
        sampling=sampling,
        vocab_size=min(loaded.tokenizer.vocab_size, setup.model_config.vocab_size),
    )


@functools.lru_cache(maxsize=8)
def _scanned_graphdef(family: str, model_config_json: str, lora: LoRASpec | None) -> nnx.GraphDef:
    """The module definition with its layers in a scan, whatever model.scan_layers says (the
    parameters are the same): with a cache, unrolled layers copy each layer's weights and cache
    out of the stacks at every step, which made a 20M model's decode step 6× slower on a CPU
    (99 ms against 15) and its prefill 2-3× slower. With `lora` (a model in training, its
    adapters beside the weights: train.eval_tasks) the adapters are part of the definition."""
    config = registry.get(family).config.model_validate_json(model_config_json)
    scanned = config.model_copy(update={"scan_layers": True})
    return nnx.split(registry.abstract_model(scanned, lora=lora), nnx.Param)[0]


def context_length(loaded: Loaded) -> int:
    """Tokens the model is made for, a prompt and its new tokens together: its source's (a
    Hugging Face model's max_position_embeddings, a jaxlm run's model.context_length or
    data.seq_len), else data.seq_len."""
    return loaded.context_length or loaded.config.data.seq_len


def encode_prompts(
    loaded: Loaded, prompts: Sequence[Prompt], names: Sequence[str], max_new_tokens: int
) -> list[np.ndarray]:
    """Each prompt's ids (text encoded as the model's documents begin; ids as they are); a
    prompt that is empty or does not fit the context with `max_new_tokens` more is a UserError
    naming it."""
    if not prompts:
        raise UserError("no prompts to continue; give at least one")
    context = context_length(loaded)
    encoded = []
    for name, prompt in zip(names, prompts, strict=True):
        if len(prompt) == 0:
            raise UserError(f"{name} is empty; give it some text to continue")
        ids = (
            loaded.tokenizer.encode_prompt(prompt)
            if isinstance(prompt, str)
            else np.asarray(prompt, np.int32)
        )
        if len(ids) + max_new_tokens > context:
            fix = (
                f"lower --max-new-tokens to {context - len(ids)} or shorten it"
                if len(ids) < context
                else "shorten it"
            )
            raise UserError(
                f"{name} has {len(ids)} tokens, which with max_new_tokens={max_new_tokens} exceed the "
                f"model's context of {context} tokens; {fix}"
            )
        encoded.append(ids)
    return encoded


def read_prompt_file(path: str) -> tuple[list[str], list[str]]:
    """The prompts of a .jsonl file (a "prompt" field per line) or a .txt file (a prompt per line),
    blank lines skipped, and what errors call each ("prompts.jsonl line 3")."""
    file = Path(path)
    if file.suffix not in (".jsonl", ".txt"):
        raise UserError(f"--prompt-file={path} is neither .jsonl nor .txt; give one of those")
    if not file.is_file():
        raise UserError(f"--prompt-file={path} does not exist; give a .jsonl or .txt file of prompts")
    prompts, names = [], []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        name = f"{path} line {number}"
        if file.suffix == ".txt":
            prompts.append(line)
        else:
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"{name} is not JSON ({error.msg}); write one JSON object per line") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise UserError(f'{name} has no "prompt" text; write {{"prompt": "..."}} on each line')
            prompts.append(record["prompt"])
        names.append(name)
    return prompts, names


def _stream(on_text: Callable[[int, str], None], first: int, row: int, text: str) -> None:
    on_text(first + row, text)


def _decode_batch(program, params, batch_sharding, prompt_ids, rows, max_new_tokens, keys, stream) -> None:
    """Prefill and decode one batch of prompts, feeding each row's tokens to its `RowText`.
    keys: the seed's key and the index of the batch's first prompt."""
    padded_rows = parallel.rows_split_evenly(len(prompt_ids), program.mesh, dict(program.rules))
    tokens, positions, segment_ids = left_pad(prompt_ids, padded_rows)
    cache_length = _round_up(tokens.shape[1] + max_new_tokens, LENGTH_QUANTUM)
    # Every process holds every prompt and places the rows of its own devices.
    placed = [
        jax.make_array_from_callback(x.shape, batch_sharding, x.__getitem__)
        for x in (tokens, positions, segment_ids)
    ]
    state, pending = _prefill(params, *placed, *keys, program=program, cache_length=cache_length)
    for drawn in range(1, max_new_tokens + 1):
        following = None
        if drawn < max_new_tokens:  # dispatched before `pending` is read: the device keeps busy
            state, following = _decode_step(params, state, program=program)
        drawn_tokens, logprobs = (np.asarray(x) for x in pending)
        for index, row in enumerate(rows):
            if row.finish_reason is None:
                row.add(int(drawn_tokens[index]), float(logprobs[index]), last=drawn == max_new_tokens)
                if stream is not None and (text := row.take_final_text()):
                    stream(index, text)
        if all(row.finish_reason is not None for row in rows):
            break
        pending = following


def left_pad(prompt_ids: Sequence[np.ndarray], rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """tokens, positions, segment_ids [rows, length]: each prompt at the end of its row, after
    padding of segment 0; positions count from each prompt's first token. Rows past the prompts
    are padding alone."""
    length = _round_up(max(len(ids) for ids in prompt_ids), LENGTH_QUANTUM)
    tokens = np.zeros((rows, length), np.int32)
    positions = np.zeros((rows, length), np.int32)
    segment_ids = np.zeros((rows, length), np.int32)
    for row, ids in enumerate(prompt_ids):
        tokens[row, length - len(ids) :] = ids
        positions[row, length - len(ids) :] = np.arange(len(ids))
        segment_ids[row, length - len(ids) :] = 1
    return tokens, positions, segment_ids


def draw(logits: jax.Array, keys: jax.Array, sampling: Sampling) -> jax.Array:
    """logits [batch, vocab] float32 → the next tokens [batch] int32, by `sampling`, each row
    drawn with its own key of keys [batch]."""
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth_largest = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
    if sampling.top_p < 1:
        descending = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(descending, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # of the tokens more likely than each
        kept = jnp.where(mass_before < sampling.top_p, descending, jnp.inf)
        logits = jnp.where(logits < jnp.min(kept, axis=-1, keepdims=True), -jnp.inf, logits)
    return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


def _next_tokens(program: _Program, model, tokens, positions, segment_ids, cache, keys, drawn):
    """The forward over `tokens` with the cache: the next token of each row (drawn from the logits
    of its last position), sharded like the rows and replicated for the host, its log probability
    (replicated), and the cache."""
    output = model(tokens, positions, segment_ids, cache, return_hidden=True)
    cache = output.cache
    logits = model.output_head().logits(output.hidden[:, -1]).astype(jnp.float32)  # [batch, vocab]
    logits = jnp.where(jnp.arange(logits.shape[-1]) < program.vocab_size, logits, -jnp.inf)
    next_tokens = draw(logits, jax.vmap(jax.random.fold_in, (0, None))(keys, drawn), program.sampling)
    logprobs = jnp.take_along_axis(jax.nn.log_softmax(logits), next_tokens[:, None], axis=-1)[:, 0]
    # Every process reads every row's token (a few bytes gathered): its rows of text are all of them.
    everywhere = NamedSharding(program.mesh, PartitionSpec())
    drawn_tokens, logprobs = (
        jax.lax.with_sharding_constraint(x, everywhere) for x in (next_tokens, logprobs)
    )
    return next_tokens, drawn_tokens, logprobs, cache


def _pinned(state: DecodeState) -> DecodeState:
    """The state constrained to its shardings (the cache by its logical axes, rows like the
    batch), so that every step gets its input as the step before left it."""
    cache = jax.tree.map(parallel.constrain, state.cache, state.cache.logical_axes())
    rows = ("batch",)
    tokens, positions = parallel.constrain(state.tokens, rows), parallel.constrain(state.positions, rows)
    return DecodeState(cache, tokens, positions, state.key, state.drawn)


@functools.partial(jax.jit, static_argnames=("program", "cache_length"))
def _prefill(params, tokens, positions, segment_ids, key, first, *, program: _Program, cache_length: int):
    """The prompts [batch, length] into a new cache → the decode state and the first tokens drawn.
    key, first: the seed's key and the index of the batch's first prompt; row r draws with
    fold_in(key, first + r)."""
    model = nnx.merge(program.graphdef, params)
    key = jax.vmap(jax.random.fold_in, (None, 0))(key, first + jnp.arange(tokens.shape[0]))
    with parallel.activation_sharding(program.mesh, dict(program.rules)):
        cache = model.init_cache(tokens.shape[0], cache_length)
        drawn = jnp.zeros((), jnp.int32)
        next_tokens, drawn_tokens, logprobs, cache = _next_tokens(
            program, model, tokens, positions, segment_ids, cache, key, drawn
        )
        state = _pinned(DecodeState(cache, next_tokens, positions[:, -1] + 1, key, drawn + 1))
    return state, (drawn_tokens, logprobs)


@functools.partial(jax.jit, static_argnames=("program",), donate_argnames=("state",))
def _decode_step(params, state: DecodeState, *, program: _Program):
    """One token per row: the state with it → the next state and the tokens drawn."""
    model = nnx.merge(program.graphdef, params)
    with parallel.activation_sharding(program.mesh, dict(program.rules)):
        inputs = state.tokens[:, None], state.positions[:, None], jnp.ones_like(state.tokens)[:, None]
        next_tokens, drawn_tokens, logprobs, cache = _next_tokens(
            program, model, *inputs, state.cache, state.key, state.drawn
        )
        state = _pinned(DecodeState(cache, next_tokens, state.positions + 1, state.key, state.drawn + 1))
    return state, (drawn_tokens, logprobs)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
