"""The typed experiment config: YAML file, dotted `key=value` overrides, validation.

Every section is a pydantic model that forbids unknown keys, so a misspelt key fails with one
line naming it (and the closest real key) before anything is compiled.
"""

from __future__ import annotations

import difflib
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml
from etils import epath
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from jaxlm.errors import ConfigError

MESH_AXES = ("data", "fsdp", "expert", "context", "tensor")

# The family `model.family` names when a config names none; checkpoints saved before families
# existed hold this family's models too.
DEFAULT_FAMILY = "llama"

# Logical axis -> mesh axes, for the axes every family shares: the batch and sequence of
# activations, the vocabulary, the residual stream, the stack of layers. A family adds its own
# axes (heads, mlp, experts, ...) with their default rules (`FamilySection.rules`); `mesh.rules`
# overrides any of them. Parameters use the plain names; activations the `act_` ones, so that the
# batch can take `fsdp` on activations while `embed` takes it on parameters.
SHARED_RULES: dict[str, list[str] | None] = {
    "batch": ["data", "fsdp"],
    "length": ["context"],
    "vocab": ["tensor"],
    # Parameters are sharded over `context` too: its devices would otherwise each hold a copy.
    "embed": ["fsdp", "context"],
    "layers": None,
    "act_embed": None,
    "act_vocab": ["tensor"],
}


# Keys that moved, with where they are now: a config that still names one is told so, and a
# checkpoint's saved config drops them (they say how a model ran, not what it is).
MOVED_KEYS = {
    "model.attention": "attention.kernel",
    **{
        f"model.{key}": f"attention.{key}"
        for key in ("splash_block_q", "splash_block_kv", "splash_interpret", "max_documents")
    },
}


def without_moved_keys(model: Mapping[str, Any]) -> dict[str, Any]:
    """A model section saved by an older jaxlm, without the keys that left it."""
    return {key: value for key, value in model.items() if f"model.{key}" not in MOVED_KEYS}


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """pydantic takes true as 1 for a number; `train.steps=true` is a mistake, not one step."""
        if isinstance(value, bool):
            annotation = cls.model_fields[info.field_name].annotation
            kinds = {annotation, *typing.get_args(annotation)}
            if bool not in kinds and kinds & {int, float}:
                raise PydanticCustomError(
                    "bool_for_number", "a boolean where a number belongs; write a number"
                )
        return value


class ModelConfig(Section):
    """What every model family shares and the rest of jaxlm reads. A family subclasses it with
    its own keys (`jaxlm.model.llama.LlamaConfig`); `model.family` picks the subclass."""

    family: str = Field(
        DEFAULT_FAMILY,
        description="Model family: its module and config keys (docs/architecture.md#model-families).",
    )
    vocab_size: int = Field(
        512, gt=0, description="Rows of the embedding table; ≥ the tokenizer's vocabulary."
    )
    d_model: int = Field(128, gt=0, description="Width of the residual stream.")
    num_layers: int = Field(2, gt=0, description="Transformer blocks (see scan_layers).")
    tie_embeddings: bool = Field(False, description="Use the embedding table as the output projection.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Compute dtype of activations and matmuls."
    )
    param_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="Storage dtype of parameters and optimizer state."
    )
    remat: str = Field(
        "none",
        description="What each block keeps for the backward pass (docs/memory.md): none (everything), save_all_dots, save_dot_except_mlpwi, save_dot_except_mlp, save_qkv_proj, save_out_proj, offload_dot_except_mlpwi, minimal or full (the layer's input only), JAX's dots and dots_no_batch, or custom.",
    )
    remat_save: list[str] = Field(
        default_factory=list,
        description="model.remat=custom: the family's named activations kept in device memory (docs/memory.md lists them).",
    )
    remat_offload: list[str] = Field(
        default_factory=list,
        description="model.remat=custom: named activations moved to pinned host memory between the forward and backward pass (TPU, GPU, CPU).",
    )
    scan_layers: bool = Field(
        True,
        description="Run the blocks with a scan (compile time flat in depth); false unrolls them: faster steps on CPU and GPU, compile time grows with depth.",
    )
    init_std: float = Field(0.02, gt=0, description="Standard deviation of the normal initialiser.")
    init_from: str | None = Field(
        None,
        description="Start from this model's parameters: a Hugging Face directory, a jaxlm run directory (its newest checkpoint) or a checkpoint step directory. The keys that shape its parameters come from it; its other family keys too unless the run sets them; a fresh optimizer and data position; a restart resumes from the run's own checkpoints.",
    )

    @model_validator(mode="after")
    def _family_check(self) -> ModelConfig:
        problem = family_section(self.family).check(self)
        if problem:
            raise ValueError(problem)
        return self


@dataclass(frozen=True)
class FamilySection:
    """What the config asks of a model family (`jaxlm.model.registry.register` gives it): its
    model section, its own logical axes with their default mesh rules, and its check of a model
    section beyond the keys' own types (one line, or None)."""

    config: type[ModelConfig]
    rules: Mapping[str, list[str] | None]
    check: Callable[[ModelConfig], str | None]


_FAMILY_SECTIONS: dict[str, FamilySection] = {}


def register_family(name: str, section: FamilySection) -> None:
    _FAMILY_SECTIONS[name] = section


def family_section(name: Any) -> FamilySection:
    if not _FAMILY_SECTIONS:
        raise ConfigError(
            "no model family is registered; import jaxlm.model (which registers the built-in families) "
            "before reading a config"
        )
    if name not in _FAMILY_SECTIONS:
        raise ConfigError(
            f"model.family={name} is not a model family; use one of {', '.join(sorted(_FAMILY_SECTIONS))}"
        )
    return _FAMILY_SECTIONS[name]


def default_rules(family: str) -> dict[str, list[str] | None]:
    """Logical axis → mesh axes for a model of `family` before mesh.rules: the shared axes' and
    the family's own."""
    rules = {**SHARED_RULES, **family_section(family).rules}
    return {axis: (list(mesh_axes) if mesh_axes else None) for axis, mesh_axes in rules.items()}


class AttentionConfig(Section):
    """How attention runs: the kernel and its settings. Not part of what a model is: a run resumes
    and a model loads with any of them."""

    kernel: Literal["auto", "xla", "cudnn", "splash"] = Field(
        "auto",
        description="Attention kernel: xla (jaxlm's einsums, any device), cudnn (cuDNN's flash attention on its packed layout; NVIDIA Hopper GPU or newer), splash (JAX's Pallas flash-attention kernel; TPU, or any device with splash_interpret), auto (splash on TPU, cudnn where it runs, else xla).",
    )
    splash_block_q: int | None = Field(
        None,
        gt=0,
        multiple_of=128,
        description="kernel=splash: the largest query block (tokens, a multiple of 128) of its kernel, forward and backward; null = 512 (MaxText's default) or the largest multiple of 128 dividing a context shard's tokens below it.",
    )
    splash_block_kv: int | None = Field(
        None,
        gt=0,
        multiple_of=128,
        description="kernel=splash: the largest key/value block (tokens, a multiple of 128), forward and backward; null = 512 or the largest multiple of 128 dividing the row below it.",
    )
    splash_interpret: bool = Field(
        False,
        description="kernel=splash: run the kernel in Pallas interpret mode, on any backend; far slower, for tests.",
    )
    max_documents: int = Field(
        8,
        gt=0,
        description="kernel=cudnn: the most documents of a packed row kept apart; later ones in the row attend within the last kept one's span (still causal). cuDNN's backward memory grows with it.",
    )


class MeshConfig(Section):
    data: int = Field(1, description="Data-parallel replicas within a slice (-1 = the remaining devices).")
    fsdp: int = Field(
        -1,
        description="Fully sharded data parallelism within a slice: shards parameters and optimizer state (-1 = the remaining devices).",
    )
    expert: int = Field(
        1,
        description="Expert parallelism within a slice: splits a mixture of experts' experts, and its tokens go to their experts' devices and back by all-to-all; the rest of the model treats it as fsdp (-1 = the remaining devices). Families with experts only.",
    )
    context: int = Field(
        1,
        description="Context parallelism within a slice: splits every row's sequence (load-balanced for the causal mask); attention gathers keys and values over it. Parameters are sharded over it as over fsdp (-1 = the remaining devices).",
    )
    tensor: int = Field(
        1, description="Tensor parallelism over heads and MLP within a slice (-1 = the remaining devices)."
    )
    dcn_data: int = Field(
        1,
        gt=0,
        description="Data parallelism across slices (over the data-center network); multiplies mesh.data.",
    )
    dcn_fsdp: int = Field(
        1, gt=0, description="FSDP across slices; multiplies mesh.fsdp. Rarely worth the DCN traffic."
    )
    dcn_expert: int = Field(
        1,
        gt=0,
        description="Expert parallelism across slices; multiplies mesh.expert. Its all-to-all then crosses the DCN.",
    )
    dcn_context: int = Field(
        1, gt=0, description="Context parallelism across slices; multiplies mesh.context. Rarely wise."
    )
    dcn_tensor: int = Field(
        1, gt=0, description="Tensor parallelism across slices; multiplies mesh.tensor. Almost never wise."
    )
    rules: dict[str, list[str] | None] = Field(
        default_factory=dict,
        description="Logical axis → mesh axes (a list, or null to replicate), over the defaults of the shared axes and the model family's own (docs/configuration.md#mesh-rules).",
    )

    @model_validator(mode="after")
    def _axes(self) -> MeshConfig:
        sizes = {axis: getattr(self, axis) for axis in MESH_AXES}
        for axis, size in sizes.items():
            if size == 0 or size < -1:
                raise ValueError(f"mesh.{axis}={size} must be a positive device count or -1")
        if list(sizes.values()).count(-1) > 1:
            raise ValueError(f"only one of {', '.join(f'mesh.{axis}' for axis in MESH_AXES)} may be -1")
        for logical, mesh_axes in self.rules.items():
            for mesh_axis in mesh_axes or ():
                if mesh_axis not in MESH_AXES:
                    raise ValueError(
                        f"mesh.rules.{logical}: {mesh_axis!r} is not a mesh axis; use {', '.join(MESH_AXES)}"
                    )
        return self


class MixtureSource(Section):
    path: str = Field(description="A directory, glob or file of .txt / .jsonl documents, as data.path.")
    weight: float = Field(gt=0, description="Share of the training rows (weights are normalised).")


class DataConfig(Section):
    path: str | None = Field(
        None,
        description="A directory, glob or file of .txt / .jsonl / .parquet documents, or a directory `jaxlm prepare` wrote, local or gs://; null = this Python's standard library source.",
    )
    mixture: list[MixtureSource] = Field(
        default_factory=list,
        description="Sources mixed by weight, [{path: ..., weight: ...}, ...], instead of data.path: each row of a batch comes from one source, in these proportions.",
    )
    tfds: str | None = Field(
        None,
        description="A TensorFlow Datasets name (e.g. 'wiki40b/en') prepared as array_record in data.tfds_data_dir; instead of data.path. jaxlm never downloads.",
    )
    tfds_data_dir: str | None = Field(
        None,
        description="Where the TFDS dataset was prepared; null = TFDS's default (~/tensorflow_datasets).",
    )
    tfds_train_split: str = Field(
        "train", description="TFDS split to train on (slicing works: 'train[:90%]')."
    )
    tfds_validation_split: str | None = Field(
        "validation", description="TFDS split to evaluate on ('train[90%:]' works); null = none."
    )
    tokenizer: str = Field(
        "byte",
        description="'byte' (built-in, 257 ids) or the path (or gs:// URL) of a Hugging Face tokenizer.json.",
    )
    eos_token: str | None = Field(
        None,
        description="End-of-document token of a tokenizer.json; null = the first of the usual names it has.",
    )
    text_field: str = Field(
        "text", description="Field of a .jsonl record, or column of a .parquet file, that holds the document."
    )
    seq_len: int = Field(128, gt=1, description="Tokens per packed row.")
    validation_fraction: float = Field(
        0.05,
        ge=0,
        lt=1,
        description="Share of documents held out for eval (by a stable hash of their name).",
    )
    worker_count: int = Field(
        0,
        ge=0,
        description="Grain worker processes per process (0 = a background thread). The data order depends on it, and its data position restores only into the same number of processes and workers; with 0 any number of processes resumes a checkpoint exactly.",
    )
    prefetch: int = Field(4, ge=0, description="Batches buffered ahead of the step.")
    chat_template: str | None = Field(
        None,
        description="Chat template for `messages` records: a .jinja file (local or gs://), 'builtin' for jaxlm's own, or null = the tokenizer's (chat_template.jinja or tokenizer_config.json beside data.tokenizer), else jaxlm's own.",
    )
    too_long: Literal["truncate", "drop"] = Field(
        "truncate",
        description="Instruction records longer than data.seq_len: keep their first seq_len tokens, or leave them out. Counted and logged either way.",
    )
    packing_bins: int = Field(
        16,
        gt=0,
        description="Rows that instruction examples are first-fit packed into at once, per stream: more bins, less padding, more host memory (bins x seq_len x 12 bytes per row of the batch).",
    )

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if self.tfds and self.path:
            raise ValueError(f"data.path={self.path} and data.tfds={self.tfds} are both set; keep one")
        if self.mixture and (self.path or self.tfds):
            other = f"data.path={self.path}" if self.path else f"data.tfds={self.tfds}"
            raise ValueError(f"data.mixture and {other} are both set; put every source in data.mixture")
        paths = [source.path for source in self.mixture]
        if len(set(paths)) < len(paths):
            raise ValueError("data.mixture names a path twice; give each source once, with its whole weight")
        return self


class LoRAConfig(Section):
    """optim.lora: low-rank adapters (LoRA) trained beside frozen weights; docs/models.md#lora-optimlora."""

    rank: int = Field(
        0,
        ge=0,
        description="Rank r of each adapter; 0 = off (every parameter trains). With r > 0 only the adapters train: no gradients or optimizer state for the base weights.",
    )
    alpha: float = Field(
        16.0, gt=0, description="The adapter's output is scaled by alpha / rank, as PEFT's lora_alpha."
    )
    dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Dropout on the adapter's input in training (PEFT's lora_dropout), seeded by train.seed and the step.",
    )
    targets: list[str] | None = Field(
        None,
        description="The projections adapted, by the family's names (llama, mistral, qwen3, gemma3: wq, wk, wv, wo, w_gate, w_up, w_down; gpt2: wqkv, wo, w_up, w_down); null = the family's default, the attention projections (wq, wk, wv, wo; gpt2's wqkv): the LoRA paper's choice, a quarter of the MLP's adapter size; add the MLP's for QLoRA's all-linear setting.",
    )
    init_from: str | None = Field(
        None,
        description="Start the adapters from a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors) made for model.init_from; its rank, alpha and targets must be these.",
    )


class OptimConfig(Section):
    lr: float = Field(3e-3, gt=0, description="Peak learning rate.")
    schedule: Literal["cosine", "wsd", "constant"] = Field(
        "cosine", description="After warmup: cosine decay, warmup-stable-decay, or constant."
    )
    warmup_steps: int = Field(20, ge=0, description="Linear warmup from 0 to optim.lr.")
    min_lr_ratio: float = Field(
        0.1, ge=0, le=1, description="Final learning rate as a fraction of optim.lr (cosine, wsd)."
    )
    decay_fraction: float = Field(0.2, gt=0, le=1, description="Share of the schedule spent decaying (wsd).")
    schedule_steps: int = Field(
        0,
        ge=0,
        description="Length of the schedule; 0 = train.steps. Set it to extend or split a run without changing the schedule.",
    )
    weight_decay: float = Field(
        0.1, ge=0, description="Decoupled (AdamW) weight decay; never applied to norms."
    )
    decay_embeddings: bool = Field(False, description="Apply weight decay to the embedding table too.")
    b1: float = Field(0.9, ge=0, lt=1, description="Adam β1.")
    b2: float = Field(0.95, ge=0, lt=1, description="Adam β2.")
    eps: float = Field(1e-8, gt=0, description="Adam ε.")
    clip_norm: float = Field(1.0, ge=0, description="Clip gradients to this global norm (0 = off).")
    offload_state: bool = Field(
        False,
        description="Keep the optimizer state in pinned host memory between steps: each step brings it to "
        "the devices for the update only (see docs/memory.md). Needs devices with pinned_host memory.",
    )
    lora: LoRAConfig = Field(
        default_factory=LoRAConfig, description="Low-rank adapters: rank, alpha, dropout, targets, init_from."
    )


class TrainConfig(Section):
    steps: int = Field(300, gt=0, description="Optimizer steps of the run.")
    global_batch_size: int = Field(16, gt=0, description="Rows per step, over all devices and micro-batches.")
    micro_batches: int = Field(
        1,
        gt=0,
        description="Gradient accumulation: micro-batches per step, inside the one jitted step.",
    )
    seed: int = Field(0, ge=0, lt=2**32, description="Seed of parameter init and data order.")
    log_every: int = Field(10, gt=0, description="Fetch and write metrics every this many steps.")
    eval_every: int = Field(
        1000,
        ge=0,
        description="Evaluate on the validation split every this many steps and at the end (0 = never).",
    )
    eval_batches: int = Field(4, gt=0, description="Batches per evaluation.")
    eval_tasks: list[str] = Field(
        default_factory=list,
        description="lm-eval tasks run at every evaluation on the current parameters, logged as eval/<task>/<metric> (needs the eval extra; docs/evaluate.md).",
    )
    eval_tasks_fewshot: int | None = Field(
        None, ge=0, description="Few-shot examples in each eval_tasks prompt; null = each task's default."
    )
    eval_tasks_limit: int | None = Field(
        None, gt=0, description="Score at most this many examples of each eval_tasks task; null = all."
    )
    eval_tasks_include_path: str | None = Field(
        None, description="A directory of lm-eval task YAML files that eval_tasks may name (local tasks)."
    )
    loss_chunk: int = Field(
        0,
        ge=0,
        description="Compute the output projection and cross-entropy this many positions at a time (0 = the whole row); bounds the memory of the logits for large vocabularies.",
    )
    profile_steps: list[int] = Field(
        default_factory=list,
        description="[first, last]: capture a jax.profiler trace of these steps into <run.dir>/profile (empty = off).",
    )

    @model_validator(mode="after")
    def _profile(self) -> TrainConfig:
        steps = self.profile_steps
        if steps and (len(steps) != 2 or not 1 <= steps[0] <= steps[1]):
            raise ValueError(f"train.profile_steps={steps} must be [first, last] with 1 <= first <= last")
        return self

    @model_validator(mode="after")
    def _tasks_need_evaluations(self) -> TrainConfig:
        if self.eval_tasks and not self.eval_every:
            raise ValueError(
                f"train.eval_tasks={self.eval_tasks} runs at evaluations, and train.eval_every=0 has none; set train.eval_every"
            )
        return self

    @model_validator(mode="after")
    def _micro(self) -> TrainConfig:
        if self.global_batch_size % self.micro_batches:
            raise ValueError(
                f"train.global_batch_size={self.global_batch_size} is not divisible by "
                f"train.micro_batches={self.micro_batches}"
            )
        return self


class CheckpointConfig(Section):
    every: int = Field(
        1000, ge=0, description="Save every this many steps and at the end (0 = only when preempted)."
    )
    keep: int = Field(3, gt=0, description="Keep the newest this many checkpoints.")
    dir: str | None = Field(
        None,
        description="Where checkpoints go, a path or gs:// URL shared by all hosts; null = <run.dir>/checkpoints.",
    )
    async_save: bool = Field(True, description="Write checkpoints in the background while training goes on.")


class DistributedConfig(Section):
    coordinator_address: str | None = Field(
        None, description="host:port of process 0's coordination service; null = cluster auto-detection."
    )
    num_processes: int | None = Field(
        None, gt=0, description="Processes in the run (with coordinator_address)."
    )
    process_id: int | None = Field(None, ge=0, description="This process's index (with coordinator_address).")
    local_device_ids: list[int] | None = Field(
        None,
        description="Accelerators this process drives (e.g. [0,1,2,3,4,5,6,7] for one process per GPU node); null = JAX's choice.",
    )
    auto_detect: bool = Field(
        True, description="Ask JAX to detect TPU VM / GKE / SLURM / Open MPI / Kubernetes clusters."
    )
    initialization_timeout_s: int = Field(
        300, gt=0, description="How long processes wait for each other at start-up."
    )
    heartbeat_timeout_s: int = Field(
        100,
        gt=0,
        description="A process silent this long is dead: the others stop with an error instead of hanging.",
    )
    preemption_grace_s: float = Field(
        30.0, gt=0, description="After SIGTERM, the time allowed to save the preemption checkpoint and exit."
    )


class RunConfig(Section):
    dir: str = Field(
        "runs/tiny",
        description="Run directory, a path or gs:// URL: config.yaml, metrics.jsonl, TensorBoard events, profiles, checkpoints.",
    )
    cpu_peak_flops: float = Field(
        1e11,
        gt=0,
        description="Peak FLOP/s of one CPU device, for MFU on CPU (accelerators use a built-in table).",
    )


class Config(Section):
    # The family's own subclass of ModelConfig, dumped with all its keys.
    model: SerializeAsAny[ModelConfig] = Field(default_factory=lambda: model_config_class(DEFAULT_FAMILY)())
    attention: AttentionConfig = Field(default_factory=AttentionConfig)
    mesh: MeshConfig = Field(default_factory=MeshConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    @field_validator("model", mode="before")
    @classmethod
    def _family_keys(cls, value: Any) -> Any:
        """Validate the model section against its family's keys."""
        if not isinstance(value, Mapping):
            return value  # a ModelConfig already, or not a section (pydantic says so)
        return model_config_class(value.get("family", DEFAULT_FAMILY)).model_validate(value)

    @model_validator(mode="after")
    def _rules(self) -> Config:
        """mesh.rules name the shared logical axes or the family's own; given rules extend the
        defaults rather than replace them."""
        defaults = default_rules(self.model.family)
        for logical in self.mesh.rules:
            if logical not in defaults:
                raise ValueError(
                    f"mesh.rules.{logical} is not a logical axis of model.family={self.model.family}"
                    f"{_did_you_mean(logical, defaults)}"
                )
        self.mesh.rules = {**defaults, **self.mesh.rules}
        expert = self.mesh.expert * self.mesh.dcn_expert
        if expert != 1 and not any("expert" in (axes or ()) for axes in self.mesh.rules.values()):
            raise ValueError(
                f"mesh.expert={self.mesh.expert} mesh.dcn_expert={self.mesh.dcn_expert}: no logical axis of "
                f"model.family={self.model.family} maps to the expert mesh axis (its models have no "
                "experts); put those devices in mesh.data or mesh.fsdp"
            )
        experts = getattr(self.model, "num_experts", None)
        if experts and expert > 0 and experts % expert and "expert" in (self.mesh.rules.get("expert") or ()):
            raise ValueError(
                f"model.num_experts={experts} does not split over mesh.expert={self.mesh.expert} × "
                f"mesh.dcn_expert={self.mesh.dcn_expert} devices; use an expert split that divides "
                f"{experts} ({', '.join(str(d) for d in range(1, experts + 1) if experts % d == 0)})"
            )
        return self

    @model_validator(mode="after")
    def _loss_chunk(self) -> Config:
        chunk, seq_len = self.train.loss_chunk, self.data.seq_len
        if chunk and seq_len % chunk:
            raise ValueError(
                f"train.loss_chunk={chunk} does not divide data.seq_len={seq_len}; use a divisor"
            )
        return self

    @property
    def checkpoint_dir(self) -> epath.Path:
        """Local path or gs:// URL of the checkpoints."""
        if self.checkpoint.dir:
            return epath.Path(self.checkpoint.dir)
        if self.run.dir.startswith("gs://"):
            return epath.Path(self.run.dir) / "checkpoints"
        return epath.Path(Path(self.run.dir).absolute() / "checkpoints")

    @property
    def schedule_steps(self) -> int:
        return self.optim.schedule_steps or self.train.steps

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def model_config_class(family: Any) -> type[ModelConfig]:
    """The config section of a registered model family."""
    return family_section(family).config


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config (or the defaults when `path` is None) and apply `key=value` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(
                f"config file {path} does not exist; pass the path of a YAML file such as configs/tiny.yaml"
            )
        if path.is_dir():
            raise ConfigError(f"config file {path} is a directory; pass the path of a YAML file in it")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {path} is not valid YAML: {_first_line(error)}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file {path} is not UTF-8 text; pass a YAML config file") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections (model:, train:, ...)")
    for override in overrides:
        apply_override(raw, override)
    return config_from_dict(raw)


def config_from_dict(raw: Mapping[str, Any]) -> Config:
    """Validate a nested dict into a Config; the first problem becomes one ConfigError line."""
    try:
        return Config.model_validate(raw)
    except pydantic.ValidationError as error:
        raise ConfigError(_describe(error, raw)) from None


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (`4`, `true`, `[a, b]`, `null`)."""
    key, sep, text = override.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(
            f"override {override!r} is not of the form section.key=value (e.g. train.steps=100)"
        )
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        value = text
    *parents, leaf = key.split(".")
    node = raw
    for depth, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {'.'.join(parents[: depth + 1])} is a value, not a section")
        node = child
    node[leaf] = value


def _describe(error: pydantic.ValidationError, raw: Mapping[str, Any]) -> str:
    problems = error.errors()
    first = problems[0]
    loc = [str(part) for part in first["loc"]]
    key = ".".join(loc)
    kind = first["type"]
    if kind == "extra_forbidden" and key in MOVED_KEYS:
        message = f"{key} is now {MOVED_KEYS[key]}; write {MOVED_KEYS[key]}={first['input']!r} instead"
    elif kind == "extra_forbidden" and (owner := _family_with_key(loc, raw)):
        family = _configured_family(raw)
        message = (
            f"{key} is a key of model.family={owner}, not of {family}; set model.family={owner} or drop it"
        )
    elif kind == "extra_forbidden":
        message = (
            f"{key} is not a config key{_did_you_mean(loc[-1], _keys_at(loc[:-1], raw), prefix=loc[:-1])}"
        )
    elif kind == "value_error":
        message = str(first["msg"]).removeprefix("Value error, ")
    elif kind in ("model_type", "dict_type") and loc:
        message = f"{key} must be a section (a mapping of keys), got {first['input']!r}"
    else:
        message = f"{key}={first['input']!r} is invalid: {first['msg'].lower()}" if key else first["msg"]
    if len(problems) > 1:
        message += f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})"
    return message


def _configured_family(raw: Mapping[str, Any]) -> Any:
    section = raw.get("model")
    return section.get("family", DEFAULT_FAMILY) if isinstance(section, Mapping) else DEFAULT_FAMILY


def _family_with_key(loc: Sequence[str], raw: Mapping[str, Any]) -> str | None:
    """For an unknown model.<key>: another registered family that has it, if any."""
    if len(loc) != 2 or loc[0] != "model":
        return None
    family = _configured_family(raw)
    owners = [
        name
        for name, section in _FAMILY_SECTIONS.items()
        if name != family and loc[1] in section.config.model_fields
    ]
    return owners[0] if owners else None


def _keys_at(loc: Sequence[str], raw: Mapping[str, Any]) -> list[str]:
    """The keys of the section at `loc`; for `model`, of the family that `raw` names."""
    model: type[BaseModel] = Config
    for part in loc:
        annotation = model.model_fields[part].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
        if model is ModelConfig:
            model = model_config_class(_configured_family(raw))
    return list(model.model_fields)


def _did_you_mean(name: str, candidates, prefix: Sequence[str] = ()) -> str:
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    if not matches:
        return ""
    return f"; did you mean {'.'.join([*prefix, matches[0]])}?"


def _first_line(error: Exception) -> str:
    return " ".join(str(error).split())
