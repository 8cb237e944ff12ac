"""Rematerialisation: what each layer keeps for the backward pass, named by what it keeps.

A family's forward names its key intermediate tensors with `jax.ad_checkpoint.checkpoint_name`
and declares those names (`ModelFamily.activations`). `model.remat` picks a preset below, which
lists the names it saves (a family saves those of them it has); `model.remat=custom` saves
`model.remat_save` and moves `model.remat_offload` to host memory between the forward and the
backward pass. Whatever is not saved is recomputed in the backward pass from the layer's input,
which every policy keeps (the layer scan's carry). `none` keeps everything, with no
rematerialisation at all.

docs/memory.md lists what each preset keeps, and its cost per layer in memory and recomputed
FLOPs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax

# The names families give their intermediates, where they have them: the presets speak of these.
QKV = ("query_proj", "key_proj", "value_proj")  # the projections' outputs, before rotary positions
ATTENTION = (*QKV, "attention_out", "out_proj")  # + the attention's output (and a flash kernel's
# residuals), before and after the output projection
MLP = ("mlp_gate", "mlp_up", "mlp_down")  # SwiGLU's projections; a plain MLP's up and down
NORMS = ("attention_norm", "mlp_norm")  # the pre-norms' outputs


@dataclass(frozen=True)
class Preset:
    summary: str  # what it keeps, for docs and errors
    save: tuple[str, ...] = ()  # names kept in device memory
    offload: tuple[str, ...] = ()  # names moved to pinned host memory until the backward pass
    generic: Callable | None = None  # one of JAX's name-blind policies instead


PRESETS: dict[str, Preset] = {
    "none": Preset("everything: no rematerialisation"),
    "save_all_dots": Preset(
        "every matmul's output: recomputes norms and elementwise ops only", save=(*ATTENTION, *MLP)
    ),
    "save_dot_except_mlpwi": Preset(
        "every matmul's output but the MLP's gate and up projections, which it recomputes",
        save=(*ATTENTION, "mlp_down"),
    ),
    "save_dot_except_mlp": Preset("the attention's matmul outputs: recomputes the MLP", save=ATTENTION),
    "save_qkv_proj": Preset("the query, key and value projections", save=QKV),
    "save_out_proj": Preset("the attention's output projection", save=("out_proj",)),
    "offload_dot_except_mlpwi": Preset(
        "what save_dot_except_mlpwi keeps, in host memory", offload=(*ATTENTION, "mlp_down")
    ),
    "minimal": Preset("nothing but the layer's input: recomputes the whole layer"),
    "full": Preset("nothing but the layer's input (the same as minimal)"),
    "dots": Preset(
        "JAX's checkpoint_dots: every matmul's output, attention scores included",
        generic=jax.checkpoint_policies.checkpoint_dots,
    ),
    "dots_no_batch": Preset(
        "JAX's checkpoint_dots_with_no_batch_dims: the outputs of matmuls with weights",
        generic=jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    ),
    "custom": Preset("model.remat_save in device memory and model.remat_offload in host memory"),
}


def preset(remat: str, save: Sequence[str] = (), offload: Sequence[str] = ()) -> Preset:
    """model.remat's preset; for `custom`, the one model.remat_save and model.remat_offload make."""
    if remat == "custom":
        return Preset(PRESETS["custom"].summary, save=tuple(save), offload=tuple(offload))
    return PRESETS[remat]


def policy(chosen: Preset) -> Callable:
    """The `jax.checkpoint` policy of a preset."""
    if chosen.generic is not None:
        return chosen.generic
    if chosen.offload:
        return jax.checkpoint_policies.save_and_offload_only_these_names(
            names_which_can_be_saved=list(chosen.save),
            names_which_can_be_offloaded=list(chosen.offload),
            offload_src="device",
            offload_dst="pinned_host",
        )
    return jax.checkpoint_policies.save_only_these_names(*chosen.save)


def checkpointed(function: Callable, remat: str, save: Sequence[str] = (), offload: Sequence[str] = ()):
    """`function` (one layer) under model.remat's policy; itself for `none`."""
    if remat == "none":
        return function
    return jax.checkpoint(function, policy=policy(preset(remat, save, offload)), prevent_cse=False)


def check(
    remat: str, save: Sequence[str], offload: Sequence[str], activations: Sequence[str], family: str
) -> str | None:
    """What is wrong with model.remat / remat_save / remat_offload for a family that names
    `activations`, in one line; None if nothing is."""
    if remat not in PRESETS:
        return f"model.remat={remat} is not a remat policy; use one of {', '.join(PRESETS)} (docs/memory.md)"
    if remat != "custom" and (save or offload):
        return "model.remat_save and model.remat_offload take effect with model.remat=custom; set it, or drop them"
    both = sorted(set(save) & set(offload))
    if both:
        return f"{', '.join(both)} in both model.remat_save and model.remat_offload; keep each name in one"
    unknown = [name for name in (*save, *offload) if name not in activations]
    if unknown:
        return (
            f"model family {family} names no activation {', '.join(unknown)}; "
            f"remat_save and remat_offload take {', '.join(activations)}"
        )
    return None


# The outputs of matmuls with weights: a policy that recomputes any of them in the backward pass
# needs that weight there again. Not mlp_down: the block's last matmul only joins the residual
# stream, which no gradient needs (Llama-2-70B's save_dot_except_mlp and save_dot_except_mlpwi
# compile to the same program), so it is never recomputed.
WEIGHT_MATMULS = (*QKV, "out_proj", "mlp_gate", "mlp_up")


def recomputes_weight_matmuls(
    remat: str, save: Sequence[str], offload: Sequence[str], activations: Sequence[str]
) -> bool:
    """Whether the policy recomputes a matmul with a weight in the backward pass, for a family
    that names `activations`. `none` and JAX's dots policies keep every such output; the named
    presets and `custom` recompute those of the family's that they neither save nor offload."""
    chosen = preset(remat, save, offload)
    if remat == "none" or chosen.generic is not None:
        return False
    kept = {*chosen.save, *chosen.offload}
    return any(name in activations and name not in kept for name in WEIGHT_MATMULS)


def offloads(remat: str, offload: Sequence[str] = ()) -> bool:
    """Whether the policy moves anything to host memory."""
    return bool(preset(remat, (), offload).offload)
