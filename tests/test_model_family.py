"""A model family is its module, its config keys and one registry entry: a GPT-2-style family
(learned positions, LayerNorm with biases, GELU MLP), defined here and touching no jaxlm module,
trains on a 2-device mesh with its own FLOPs, weight-decay rule, logical axes and auxiliary loss,
and generates and evaluates through its own cache."""

import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import read_metrics
from flax import nnx
from pydantic import Field

import jaxlm
from jaxlm.config import ModelConfig, load_config
from jaxlm.errors import ConfigError
from jaxlm.evaluation.evaluate import run_eval
from jaxlm.inference.generation import complete
from jaxlm.model import registry
from jaxlm.model.layers import attention_mask, dtype_of, param, xla_attention
from jaxlm.parallel import constrain
from jaxlm.training.metrics import model_flops_per_step
from jaxlm.training.optim import weight_decay_mask
from jaxlm.training.setup import build_model
from jaxlm.training.train import train


class ToyGPTConfig(ModelConfig):
    num_heads: int = Field(2, gt=0, description="Attention heads.")
    max_positions: int = Field(64, gt=0, description="Rows of the learned position table.")


class LayerNorm(nnx.Module):
    def __init__(self, config: ToyGPTConfig):
        dim, dtype = config.d_model, dtype_of(config.param_dtype)
        self.scale = nnx.Param(jnp.ones((dim,), dtype), out_sharding=("embed",), eager_sharding=False)
        self.bias = nnx.Param(jnp.zeros((dim,), dtype), out_sharding=("embed",), eager_sharding=False)

    def __call__(self, x):
        mean = jnp.mean(x, axis=-1, keepdims=True)
        normed = (x - mean) * jax.lax.rsqrt(jnp.var(x, axis=-1, keepdims=True) + 1e-5)
        return normed * self.scale[...] + self.bias[...]


class ToyBlock(nnx.Module):
    def __init__(self, config: ToyGPTConfig, rngs: nnx.Rngs):
        d, h, std, dtype = config.d_model, config.num_heads, config.init_std, dtype_of(config.param_dtype)
        self.num_heads = h
        self.attention_norm, self.mlp_norm = LayerNorm(config), LayerNorm(config)
        self.qkv = param(rngs, (d, 3 * d), ("embed", "toy_qkv"), std, dtype)
        self.qkv_bias = nnx.Param(jnp.zeros((3 * d,), dtype), out_sharding=("toy_qkv",), eager_sharding=False)
        self.out = param(rngs, (d, d), ("toy_qkv", "embed"), std, dtype)
        self.up = param(rngs, (d, 4 * d), ("embed", "toy_qkv"), std, dtype)
        self.down = param(rngs, (4 * d, d), ("toy_qkv", "embed"), std, dtype)

    def __call__(self, x, mask):
        batch, length, d = x.shape
        qkv = self.attention_norm(x) @ self.qkv[...] + self.qkv_bias[...]
        q, k, v = (part.reshape(batch, length, self.num_heads, -1) for part in jnp.split(qkv, 3, axis=-1))
        x = x + xla_attention(q, k, v, mask).reshape(batch, length, d) @ self.out[...]
        return x + jax.nn.gelu(self.mlp_norm(x) @ self.up[...]) @ self.down[...]


@flax.struct.dataclass
class ToyCache:
    """The tokens so far, whose forward is computed again at each step: the simplest cache the
    contract allows (a real family keeps keys and values)."""

    tokens: jax.Array  # [batch, max_length]
    positions: jax.Array
    segment_ids: jax.Array  # 0 in slots not yet written
    length: jax.Array  # int32 scalar

    @staticmethod
    def logical_axes() -> "ToyCache":
        rows = ("batch", None)
        return ToyCache(tokens=rows, positions=rows, segment_ids=rows, length=())


class ToyGPT(nnx.Module):
    def __init__(self, config: ToyGPTConfig, rngs: nnx.Rngs, kernel=None, lora=None):
        std, dtype = config.init_std, dtype_of(config.param_dtype)
        self.embedding = param(rngs, (config.vocab_size, config.d_model), ("vocab", "embed"), std, dtype)
        self.positions = param(rngs, (config.max_positions, config.d_model), (None, "embed"), std, dtype)
        self.blocks = nnx.List([ToyBlock(config, rngs) for _ in range(config.num_layers)])
        self.final_norm = LayerNorm(config)

    def __call__(self, tokens, positions, segment_ids, cache=None, *, return_hidden=False):
        if cache is not None:
            return self._continue(tokens, positions, segment_ids, cache, return_hidden)
        x = constrain(
            self.embedding[...][tokens] + self.positions[...][positions], ("batch", "length", "act_embed")
        )
        mask = attention_mask(segment_ids)
        for block in self.blocks:
            x = block(x, mask)
        hidden = self.final_norm(x)
        # An auxiliary loss, as a mixture of experts adds its load balancing: the train step adds it.
        aux_losses = {"toy_norm": 1e-3 * jnp.mean(jnp.square(hidden.astype(jnp.float32)))}
        if return_hidden:
            return registry.ModelOutput(hidden=hidden, aux_losses=aux_losses)
        return registry.ModelOutput(logits=self.output_head().logits(hidden), aux_losses=aux_losses)

    def _continue(self, tokens, positions, segment_ids, cache: ToyCache, return_hidden: bool):
        """The new tokens written after the cache's, the whole row's forward, the new ones' outputs."""
        start, length = cache.length, tokens.shape[1]
        write = jax.lax.dynamic_update_slice_in_dim
        cache = ToyCache(
            write(cache.tokens, tokens, start, axis=1),
            write(cache.positions, positions, start, axis=1),
            write(cache.segment_ids, segment_ids, start, axis=1),
            start + length,
        )
        whole = self(cache.tokens, cache.positions, cache.segment_ids, return_hidden=return_hidden)
        out = whole.hidden if return_hidden else whole.logits
        new = jax.lax.dynamic_slice_in_dim(out, start, length, axis=1)
        if return_hidden:
            return registry.ModelOutput(hidden=new, cache=cache)
        return registry.ModelOutput(logits=new, cache=cache)

    def output_head(self):
        return registry.OutputHead(self.embedding[...].T)  # tied, as in GPT-2

    def init_cache(self, batch, max_length):
        rows = jnp.zeros((batch, max_length), jnp.int32)
        return ToyCache(rows, rows, rows, jnp.zeros((), jnp.int32))


def toy_flops_per_token(config: ToyGPTConfig, seq_len: int) -> float:
    d = config.d_model
    matmul_params = config.num_layers * (3 * d * d + d * d + 8 * d * d) + d * config.vocab_size
    return 6 * matmul_params + 12 * config.num_layers * d * seq_len


def toy_decays(path: str, decay_embeddings: bool) -> bool:
    name = path.rsplit(".", 1)[-1]
    return name not in ("scale", "bias", "qkv_bias", "positions") and (
        decay_embeddings or name != "embedding"
    )


TOY_GPT = registry.ModelFamily(
    name="toy_gpt",
    config=ToyGPTConfig,
    build=ToyGPT,
    flops_per_token=toy_flops_per_token,
    decays=toy_decays,
    shape_keys=("vocab_size", "d_model", "num_layers", "num_heads", "max_positions"),
    rules={"toy_qkv": ("tensor",)},  # its own logical axis, split by tensor parallelism by default
)


@pytest.fixture(scope="module")
def toy_family():
    registry.register(TOY_GPT)
    return TOY_GPT


def toy_config(run_dir, *overrides):
    return load_config(
        None,
        [
            "model.family=toy_gpt",
            "model.vocab_size=264",
            "model.d_model=32",
            "model.num_layers=2",
            "model.max_positions=32",
            "data.seq_len=32",
            "train.global_batch_size=4",
            "train.log_every=1",
            "train.eval_every=0",
            "checkpoint.every=0",
            "optim.warmup_steps=0",
            "mesh.fsdp=2",
            f"run.dir={run_dir}",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory, toy_family):
    """A toy run of 2 steps on a 2-device mesh, evaluated and saved at step 2."""
    run_dir = tmp_path_factory.mktemp("toy")
    config = toy_config(
        run_dir, "train.steps=2", "checkpoint.every=2", "train.eval_every=2", "train.eval_batches=1"
    )
    return config, train(config, devices=jax.devices()[:2])


def test_a_registered_family_trains_on_a_two_device_mesh(toy_run):
    config, result = toy_run
    assert isinstance(config.model, ToyGPTConfig) and config.model.max_positions == 32
    assert result.step == 2
    records = [record for record in read_metrics(config.run.dir) if "loss" in record]
    assert [record["step"] for record in records] == [1, 2]
    assert all(math.isfinite(record["loss"]) for record in records)
    assert abs(records[0]["loss"] - math.log(264)) < 0.2  # untrained: near uniform over the vocabulary
    assert records[1]["loss"] < records[0]["loss"]
    # The family's auxiliary loss is logged by name beside the loss (which it is not part of).
    assert all(0 < record["aux/toy_norm"] < 1e-2 for record in records)
    # MFU counts the family's FLOPs, not a Llama's.
    tokens = config.train.global_batch_size * config.data.seq_len
    assert model_flops_per_step(config) == toy_flops_per_token(config.model, config.data.seq_len) * tokens
    assert records[1]["mfu"] > 0
    evaluations = [record for record in read_metrics(config.run.dir) if "eval_loss" in record]
    assert [record["step"] for record in evaluations] == [2]
    # Resuming the saved run restores the family's parameters (the config keys are saved with them).
    resumed = toy_config(config.run.dir, "train.steps=3")
    assert train(resumed, devices=jax.devices()[:2]).step == 3


def test_the_familys_own_logical_axes_take_its_default_rules_and_mesh_rules_override_them(
    tmp_path, toy_family
):
    config = toy_config(tmp_path, "mesh.fsdp=1", "mesh.tensor=2")
    assert config.mesh.rules["toy_qkv"] == ["tensor"] and "heads" not in config.mesh.rules
    setup = build_model(config, devices=jax.devices()[:2])
    assert tuple(setup.param_shardings["blocks"][0]["qkv"].spec) == (("fsdp", "context"), "tensor")
    replicated = build_model(
        toy_config(tmp_path, "mesh.fsdp=1", "mesh.tensor=2", "mesh.rules.toy_qkv=null"), jax.devices()[:2]
    )
    assert tuple(replicated.param_shardings["blocks"][0]["qkv"].spec) == (("fsdp", "context"), None)


def test_a_family_with_its_own_cache_generates_its_greedy_tokens_and_evaluates(toy_run, tmp_path):
    config, _ = toy_run
    loaded = jaxlm.load(config.run.dir, devices=jax.devices()[:2])
    prompts = [[256, *b"def f(x):"], [256, *b"import"]]  # of two lengths: the shorter is left-padded
    completions = complete(loaded, prompts, max_new_tokens=6, greedy=True)
    model = loaded.model()
    for prompt, completion in zip(prompts, completions, strict=True):
        tokens = list(prompt)
        for _ in range(len(completion.token_ids)):  # the whole forward again per token: no cache
            row = jnp.asarray(tokens)[None]
            logits = model(row, jnp.arange(len(tokens))[None], jnp.ones_like(row)).logits[0, -1]
            tokens.append(int(jnp.argmax(logits[: loaded.tokenizer.vocab_size])))
        assert completion.token_ids == tokens[len(prompt) :]
    document = tmp_path / "doc.txt"
    document.write_text("def add(a, b):\n    return a + b\n" * 8)
    scores = run_eval(loaded, data=str(document))["data"]
    assert np.isfinite(scores["loss"]) and abs(scores["loss"] - math.log(264)) < 0.5


def test_a_family_without_context_parallelism_refuses_a_context_axis_in_one_line(tmp_path, toy_family):
    with pytest.raises(
        ConfigError, match=r"^model.family=toy_gpt does not lay its rows out for context parallelism"
    ):
        build_model(toy_config(tmp_path, "mesh.context=2", "mesh.fsdp=4"))


def test_the_family_decides_which_parameters_decay(toy_family):
    params = nnx.to_pure_dict(nnx.state(registry.abstract_model(toy_config("unused").model), nnx.Param))
    mask = weight_decay_mask(params, toy_family, decay_embeddings=False)
    assert mask["positions"] is False and mask["embedding"] is False
    assert mask["blocks"][0]["qkv"] is True and mask["blocks"][0]["qkv_bias"] is False
    assert mask["blocks"][1]["mlp_norm"] == {"scale": False, "bias": False}


def test_another_familys_keys_are_refused_with_one_line(tmp_path, toy_family):
    from jaxlm.errors import ConfigError

    with pytest.raises(
        ConfigError,
        match=r"^model.num_kv_heads is a key of model.family=llama, not of toy_gpt; set model.family=llama or drop it$",
    ):
        toy_config(tmp_path, "model.num_kv_heads=2")
    with pytest.raises(
        ConfigError, match=r"^model.max_position is not a config key; did you mean model.max_positions\?$"
    ):
        toy_config(tmp_path, "model.max_position=2")
