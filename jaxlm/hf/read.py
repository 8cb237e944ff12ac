"""Hugging Face checkpoints in: a family's model keys from config.json, and its parameters read
from safetensors straight into their shardings. Each process reads only the slices its own
devices hold, so no host ever holds the whole model."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from safetensors import safe_open

from jaxlm.errors import UserError
from jaxlm.hf.files import HFDirectory
from jaxlm.model import registry
from jaxlm.model.registry import HFTensor

log = logging.getLogger("jaxlm")


def model_keys(directory: HFDirectory) -> dict[str, Any]:
    """The jaxlm model keys of the directory's config.json (its family's and architecture's), with
    model.param_dtype the dtype its tensors were saved in (bfloat16 or float32)."""
    family = registry.family_of_architecture(directory.architecture)
    keys = family.hf.config_from_hf(directory.config)
    saved = directory.config.get("dtype") or directory.config.get("torch_dtype")
    return {**keys, "param_dtype": "bfloat16" if saved == "bfloat16" else "float32"}


def layer_names(tensor: HFTensor, num_layers: int) -> list[str]:
    """The Hugging Face names holding `tensor`: one per layer (and expert) for a stacked parameter."""
    return [name for _, name in tensor.names(num_layers)]


def stored_names(
    directory: HFDirectory, tensor: HFTensor, num_layers: int, optional_prefix: str = ""
) -> list[str]:
    """`layer_names` as the directory stores them: without the family's optional prefix where
    its files lack it."""
    names = layer_names(tensor, num_layers)
    if optional_prefix and names[0] not in directory.shapes:
        bare = [name.removeprefix(optional_prefix) for name in names]
        if bare[0] in directory.shapes:
            return bare
    return names


def check_tensors(
    directory: HFDirectory, tensors: Sequence[HFTensor], num_layers: int, optional_prefix: str = ""
) -> None:
    """Every tensor the model needs is in the directory with the shape its config.json implies."""
    for tensor in tensors:
        for name in stored_names(directory, tensor, num_layers, optional_prefix):
            if name not in directory.shapes:
                raise UserError(
                    f"{directory.path} has no tensor {name}, which its config.json's "
                    f"{directory.architecture} needs; is the checkpoint complete?"
                )
            found = directory.shapes[name]
            if found != tensor.hf_shape:
                raise UserError(
                    f"tensor {name} in {directory.files[name]} has shape {list(found)}, expected "
                    f"{list(tensor.hf_shape)} from config.json; the weights and config.json disagree"
                )
    used = {
        name for tensor in tensors for name in stored_names(directory, tensor, num_layers, optional_prefix)
    }
    unused = sorted(set(directory.shapes) - used)
    if unused:
        log.warning(
            "ignoring %d tensors jaxlm's model has no place for: %s", len(unused), ", ".join(unused[:5])
        )


def read_params(directory: HFDirectory, setup) -> Any:
    """The parameters of `setup` (a `jaxlm.training.setup.ModelSetup` of the directory's model keys; its
    base, without adapters) from its safetensors, each a jax.Array on its sharding in the model's
    param_dtype."""
    config = setup.model_config
    tensors = {tensor.param: tensor for tensor in setup.family.hf.tensors(config)}
    prefix = setup.family.hf.optional_prefix
    check_tensors(directory, list(tensors.values()), config.num_layers, prefix)
    dtype = np.dtype(config.param_dtype)
    with contextlib.ExitStack() as stack:
        handles = {
            file: stack.enter_context(safe_open(file, framework="numpy"))
            for file in sorted(set(directory.files.values()))
        }

        def read(path, abstract, sharding):
            tensor = tensors[jax.tree_util.keystr(path, simple=True, separator=".")]
            slices = [
                handles[directory.files[name]].get_slice(name)
                for name in stored_names(directory, tensor, config.num_layers, prefix)
            ]
            return _sharded_array(tensor, slices, abstract.shape, dtype, sharding)

        return jax.tree_util.tree_map_with_path(read, setup.base_abstract_params, setup.base_param_shardings)


def _sharded_array(
    tensor: HFTensor, slices: list, shape: tuple[int, ...], dtype: np.dtype, sharding
) -> jax.Array:
    """A global array of `shape` whose shards are read, each once, from the safetensors `slices`
    (one per layer, or per layer and expert, for a stacked parameter)."""
    blocks: dict[tuple, np.ndarray] = {}  # devices holding the same shard share one read

    def block(index: tuple[slice, ...]) -> np.ndarray:
        bounds = tuple(part.indices(size)[:2] for part, size in zip(index, shape, strict=True))
        if bounds not in blocks:
            ranges = [slice(start, stop) for start, stop in bounds]
            if tensor.experts:  # slices: each layer's experts in turn
                read = np.stack(
                    [
                        np.stack(
                            [
                                read_block(slices[layer * tensor.experts + e], tensor, ranges[2:])
                                for e in range(*bounds[1])
                            ]
                        )
                        for layer in range(*bounds[0])
                    ]
                )
            elif tensor.stacked:
                layers = range(*bounds[0])
                read = np.stack([read_block(slices[layer], tensor, ranges[1:]) for layer in layers])
            else:
                read = read_block(slices[0], tensor, ranges)
            blocks[bounds] = read.astype(dtype, copy=False)
        return blocks[bounds]

    return jax.make_array_from_callback(shape, sharding, block)


def read_block(tensor_slice, tensor: HFTensor, index: Sequence[slice]) -> np.ndarray:
    """The block `index` (over the axes of one layer's parameter) of a Hugging Face tensor, read
    from a safetensors slice: each of its axes is read as the range that covers the block."""
    view_index = [slice(None)] * len(tensor.view)
    for parameter_axis, view_axis in enumerate(tensor.order):
        view_index[view_axis] = index[parameter_axis]
    hf_index, local_shape, local_index = [], [], []
    for group in view_groups(tensor.hf_shape, tensor.view):
        lead, inner = view_index[group[0]], math.prod(tensor.view[axis] for axis in group[1:])
        hf_index.append(slice(lead.start * inner, lead.stop * inner))
        local_shape += [lead.stop - lead.start, *(tensor.view[axis] for axis in group[1:])]
        local_index += [slice(None), *(view_index[axis] for axis in group[1:])]
    read = np.asarray(tensor_slice[tuple(hf_index)]).reshape(local_shape)
    return read[tuple(local_index)].transpose(tensor.order)


def view_groups(hf_shape: Sequence[int], view: Sequence[int]) -> list[list[int]]:
    """For each axis of a Hugging Face tensor, the axes of `view` it splits into."""
    groups, axis = [], 0
    for size in hf_shape:
        group, product = [], 1
        while axis < len(view) and (not group or product != size):
            group.append(axis)
            product *= view[axis]
            axis += 1
        groups.append(group)
    groups[-1] += list(range(axis, len(view)))
    return groups
