"""Remat policies by name: every preset (and a custom save/offload list) gives the gradients of no
rematerialisation, keeps exactly the named activations it says it keeps, and a bad policy is one
line before anything is built."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, tiny_config
from flax import nnx
from jax._src.ad_checkpoint import (
    saved_residuals,
)  # the analysis jax.ad_checkpoint.print_saved_residuals prints

from jaxlm.config import load_config
from jaxlm.errors import ConfigError
from jaxlm.model import registry, remat
from jaxlm.model.layers import AttentionKernel

CUSTOM = ["model.remat_save=[mlp_gate,attention_norm]", "model.remat_offload=[attention_out,out_proj]"]
ROWS = 2


def loss_of(config, length: int = 32):
    """The model's parameters and a loss of them: a weighted sum of log-probabilities over two
    packed documents per row (different weights per position, so no gradient is trivially 0)."""
    kernel = AttentionKernel.of(config.attention, config.attention.kernel)  # as the config names it
    model = registry.build(config.model, nnx.Rngs(0), kernel)
    graphdef, params = nnx.split(model)
    tokens = jax.random.randint(jax.random.key(1), (ROWS, length), 0, config.model.vocab_size)
    positions = jnp.tile(jnp.arange(length), (ROWS, 1))
    segments = jnp.where(jnp.arange(length) < 20, 1, 2)[None].repeat(ROWS, 0)
    weights = jnp.cos(jnp.arange(length, dtype=jnp.float32))[None, :, None]

    def loss(params):
        logits = nnx.merge(graphdef, params)(tokens, positions, segments).logits
        return (jax.nn.log_softmax(logits) * weights).mean()

    return params, loss


def config_with(policy: str, *overrides: str):
    extra = CUSTOM if policy == "custom" else []
    return load_config(None, [*TINY, "attention.kernel=xla", f"model.remat={policy}", *extra, *overrides])


@pytest.fixture(scope="module")
def reference_grads():
    params, loss = loss_of(config_with("none"))
    return jax.jit(jax.grad(loss))(params)


@pytest.mark.parametrize("policy", [name for name in remat.PRESETS if name != "none"])
def test_every_policy_gives_the_gradients_of_no_remat(policy, reference_grads):
    params, loss = loss_of(config_with(policy))
    grads = jax.jit(jax.grad(loss))(params)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(reference_grads), strict=True):
        scale = float(jnp.max(jnp.abs(want)))
        assert scale > 0
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * scale)


def kept(config, length: int = 32) -> tuple[dict[str, int], int, list[str]]:
    """What the backward pass keeps, layers unrolled (a scan hides names inside its body): how
    many of each named activation in device memory, how many arrays in host memory (offloaded
    ones lose their names), and where the unnamed device residuals come from."""
    params, loss = loss_of(config, length)
    named: dict[str, int] = {}
    host, unnamed = 0, []
    for aval, where in saved_residuals(loss, params):
        if str(getattr(aval, "memory_space", "")).endswith("Host"):
            host += 1
        elif where.startswith("named '"):
            name = where.split("'")[1]
            named[name] = named.get(name, 0) + 1
        else:
            unnamed.append(where)
    return named, host, unnamed


NAMED_PRESETS = [name for name, chosen in remat.PRESETS.items() if chosen.generic is None and name != "none"]


@pytest.mark.parametrize("policy", NAMED_PRESETS)
def test_a_policy_keeps_exactly_the_activations_it_names(policy):
    config = config_with(policy, "model.scan_layers=false")
    chosen = remat.preset(policy, config.model.remat_save, config.model.remat_offload)
    # mlp_down's output only feeds the residual add, whose backward needs no input: never kept.
    saved, offloaded = (set(names) - {"mlp_down"} for names in (chosen.save, chosen.offload))
    layers = config.model.num_layers
    named, host, _ = kept(config)
    assert named == {name: layers for name in saved}
    assert host == layers * len(offloaded)


def test_splash_keeps_its_output_and_residuals_by_name():
    """With splash attention, keeping attention_out keeps the kernel's output and log-sum-exp for
    its backward, rather than running the forward kernel again."""
    overrides = ["attention.kernel=splash", "attention.splash_interpret=true", "model.scan_layers=false"]
    overrides += ["model.head_dim=128", "model.num_layers=1"]
    _, _, with_out = kept(config_with("save_dot_except_mlp", *overrides), length=128)
    _, _, without = kept(config_with("save_qkv_proj", *overrides), length=128)
    assert sum("splash_attention" in where for where in with_out) == 2  # output and log-sum-exp
    assert not any("splash_attention" in where for where in without)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.remat=sometimes"], "model.remat=sometimes is not a remat policy; use one of none,"),
        (["model.remat_save=[mlp_up]"], "take effect with model.remat=custom"),
        (
            ["model.remat=custom", "model.remat_save=[mlp_up]", "model.remat_offload=[mlp_up]"],
            "mlp_up in both",
        ),
        (
            ["model.remat=custom", "model.remat_offload=[attn]"],
            "model family llama names no activation attn;",
        ),
    ],
)
def test_a_bad_policy_is_one_line(tmp_path, overrides, message):
    with pytest.raises(ConfigError) as error:
        tiny_config(tmp_path, *overrides)
    assert message in str(error.value) and "\n" not in str(error.value)
