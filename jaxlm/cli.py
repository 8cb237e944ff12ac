"""`jaxlm` command line: parse → config → one function call. User errors are one line, exit 2."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys

from jaxlm.config import MESH_AXES
from jaxlm.errors import PreemptionGraceExpired, UserError

log = logging.getLogger("jaxlm")


class _ProcessIndexFilter(logging.Filter):
    """Stamp every record with the JAX process index (0 before jax.distributed starts)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.process_index = _process_index()
        return True


def setup_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ProcessIndexFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s jaxlm[p%(process_index)s] %(message)s", "%H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False
    for noisy in ("absl", "orbax", "jax._src.xla_bridge"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cpu_devices_for_mesh(mesh) -> int:
    """Devices the mesh names explicitly: the product of its fixed axis sizes, DCN slices included
    (an axis at -1 adds none)."""
    sizes = [getattr(mesh, axis) for axis in MESH_AXES] + [getattr(mesh, f"dcn_{axis}") for axis in MESH_AXES]
    return math.prod(size for size in sizes if size > 0)


def _use_cpu_devices_for_mesh(config) -> None:
    """On a CPU-only machine, give XLA as many host devices as the mesh asks for explicitly, so
    `mesh.fsdp=4 mesh.data=2` works on a laptop without setting XLA_FLAGS by hand."""
    import jax

    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return
    explicit = cpu_devices_for_mesh(config.mesh)
    if explicit > 1:
        jax.config.update("jax_num_cpu_devices", explicit)


def _start(config, cpu_devices: bool = True) -> None:
    """Start jax.distributed where config.distributed (or a detected cluster) asks for several
    processes; in a single one, before any backend starts, give a CPU-only machine the host
    devices config.mesh asks for (with `cpu_devices`)."""
    import jax

    from jaxlm import distributed

    distributed.initialize(config.distributed)
    if cpu_devices and not jax.distributed.is_initialized():
        _use_cpu_devices_for_mesh(config)


# Exit status of a run stopped by SIGTERM after saving its checkpoint (EX_TEMPFAIL: try again):
# not 0, so SLURM (launch/slurm.sbatch), JobSet and scripts see a run that is not finished.
PREEMPTED = 75


def _train(args: argparse.Namespace) -> int:
    from jaxlm.config import load_config

    config = load_config(args.config, args.overrides)
    _start(config)
    from jaxlm.training.train import train

    result = train(config, given={override.partition("=")[0] for override in args.overrides})
    return PREEMPTED if result.preempted else 0


def _prepare(args: argparse.Namespace) -> int:
    from jaxlm.config import load_config
    from jaxlm.data.prepare import prepare

    config = load_config(args.config, args.overrides)
    prepare(config.data, args.out, shards=args.shards, workers=args.workers)
    return 0


def _plan(args: argparse.Namespace) -> int:
    import jax

    # Compile-only TPU devices need no backend but the CPU; never open this host's accelerators.
    jax.config.update("jax_platforms", "cpu")
    from jaxlm.config import load_config
    from jaxlm.planning import plan

    config = load_config(args.config, args.overrides)
    if args.sweep:
        from jaxlm.planning import sweep as plan_sweep

        trials = plan_sweep.sweep(config, args.topology)
        print(plan_sweep.format_sweep(args.topology, trials))
        return 0 if any(trial.fits for trial in trials) else 1
    log.info("compiling the train step of %s for %s", args.config, args.topology)
    result = plan.plan(config, args.topology)
    print(plan.format_plan(result))
    return 0 if result.fits else 1


def _export_hf(args: argparse.Namespace) -> int:
    from jaxlm.config import load_config

    others = [override for override in args.overrides if not override.startswith("distributed.")]
    if others:
        raise UserError(f"export-hf takes only distributed.* overrides, not {' '.join(others)}")
    _start(load_config(None, args.overrides), cpu_devices=False)
    if args.adapter:
        from jaxlm.inference.export import export_adapter

        export_adapter(args.source, args.out, step=args.step, dtype=args.dtype)
        return 0
    from jaxlm.inference.export import export

    export(args.source, args.out, step=args.step, dtype=args.dtype)
    return 0


def _generate(args: argparse.Namespace) -> int:
    """Continue the prompts: one streamed to stdout as it comes, or a JSON line per prompt of a file."""
    import json

    import jax

    from jaxlm.config import load_config
    from jaxlm.inference.generation import complete, iter_completions, read_prompt_file
    from jaxlm.inference.loading import load

    others = [override for override in args.overrides if not override.startswith("distributed.")]
    if others:
        raise UserError(f"generate takes PATH, options and distributed.* overrides, not {' '.join(others)}")
    if args.prompt is not None:
        prompts, names = [args.prompt], ["--prompt"]
        if not args.prompt:
            raise UserError("--prompt is empty; give it some text to continue")
    else:
        prompts, names = read_prompt_file(args.prompt_file)
    # Several processes (a model too large for one host) each hold every prompt and draw every
    # token; process 0 prints them.
    _start(load_config(None, args.overrides), cpu_devices=False)
    printing = jax.process_index() == 0
    loaded = load(args.path)
    options = {
        "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
        "top_p": args.top_p, "greedy": args.greedy, "seed": args.seed, "stop": args.stop or (),
        "batch_size": args.batch_size, "names": names,
    }  # fmt: skip
    if args.prompt is not None:
        stream = (lambda _, text: print(text, end="", flush=True)) if printing else None
        complete(loaded, prompts, on_text=stream, **options)
        if printing:
            print()
        return 0
    for prompt, completion in zip(prompts, iter_completions(loaded, prompts, **options), strict=True):
        if printing:
            print(json.dumps({"prompt": prompt, "completion": completion.text}), flush=True)
    return 0


def _eval(args: argparse.Namespace) -> int:
    """Score a model on a dataset (loss, perplexity, bits per byte) and/or lm-eval tasks; print a
    table, and write the whole report as JSON with --output."""
    import json

    from jaxlm.config import load_config
    from jaxlm.evaluation import evaluate

    tasks = [task for task in (args.tasks or "").split(",") if task]
    if args.data is None and not tasks:
        raise UserError("eval needs --data FILE_OR_DIR, --tasks TASK[,TASK...] or both")
    evaluate.check_overrides(args.overrides)
    if tasks:  # before any weight is read: lm-eval installed, every task found
        evaluate.lm_eval_adapter().check_tasks(tasks, args.include_path)
    import jax

    # Several processes (a model too large for one host) each run every request on their shards;
    # process 0 prints and writes the report.
    _start(load_config(None, [o for o in args.overrides if o.startswith(("mesh.", "distributed."))]))
    from jaxlm.inference.loading import load

    report = evaluate.run_eval(
        load(args.path, overrides=args.overrides, step=args.step),
        data=args.data, tasks=tasks, num_fewshot=args.num_fewshot, limit=args.limit,
        include_path=args.include_path, batch_size=args.batch_size, max_length=args.max_length,
        bootstrap_iters=args.bootstrap_iters,
    )  # fmt: skip
    if jax.process_index() != 0:
        return 0
    print(report.pop("table"))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as file:
            json.dump({"model": args.path, "step": args.step, **report}, file, indent=2, default=str)
    return 0


def _limit(value: str) -> int | float:
    """--limit: a count of examples, or a fraction of them below 1 (as lm-eval takes it)."""
    number = float(value)
    return number if number < 1 else int(number)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxlm", description="Train language models on JAX device meshes.")
    commands = parser.add_subparsers(dest="command", required=True)
    train_parser = commands.add_parser("train", help="train (or resume) the run a config describes")
    train_parser.add_argument("config", help="YAML config, e.g. configs/tiny.yaml")
    train_parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.steps=100"
    )
    train_parser.set_defaults(run=_train)
    prepare_parser = commands.add_parser(
        "prepare",
        help="tokenize the config's documents once, into ArrayRecord shards that data.path can name",
    )
    prepare_parser.add_argument("config", help="YAML config: its data section (source, tokenizer, split)")
    prepare_parser.add_argument("--out", required=True, help="a new directory for the prepared data")
    prepare_parser.add_argument("--shards", type=int, help="files per split (default: the workers)")
    prepare_parser.add_argument("--workers", type=int, help="tokenizing processes (default: the CPU cores)")
    prepare_parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. data.path=~/corpus"
    )
    prepare_parser.set_defaults(run=_prepare)
    plan_parser = commands.add_parser(
        "plan",
        help="compile the train step for a TPU topology on this host: does it fit, how fast will it run",
    )
    plan_parser.add_argument("config", help="YAML config, e.g. configs/llama3_8b.yaml")
    plan_parser.add_argument(
        "--topology", required=True, help="TPU generation:shape as JAX names it, e.g. v5e:2x2, v5p:4x4x4"
    )
    plan_parser.add_argument(
        "--sweep",
        action="store_true",
        help="try the splits of the topology over data/fsdp/context/tensor, remat policies and micro-batches; "
        "rank what fits by step time",
    )
    plan_parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. model.remat=full"
    )
    plan_parser.set_defaults(run=_plan)
    export_parser = commands.add_parser(
        "export-hf",
        help="write a run's model as a Hugging Face directory (config.json, safetensors, tokenizer)",
    )
    export_parser.add_argument(
        "source", help="a jaxlm run directory, one of its checkpoint steps, or an HF directory"
    )
    export_parser.add_argument("out", help="a new (or empty) directory for the Hugging Face model")
    export_parser.add_argument("--step", type=int, help="the checkpoint step to export (default: the newest)")
    export_parser.add_argument(
        "--dtype",
        choices=("bfloat16", "float32"),
        help="dtype of the tensors written (default: model.param_dtype)",
    )
    export_parser.add_argument(
        "--adapter",
        action="store_true",
        help="write only the run's LoRA adapters, in PEFT's format (adapter_config.json, "
        "adapter_model.safetensors); default: the whole model with the adapters merged in",
    )
    export_parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="distributed.* keys, for several processes"
    )
    export_parser.set_defaults(run=_export_hf)
    generate_parser = commands.add_parser(
        "generate",
        help="continue prompts with a trained model: a jaxlm run directory or a Hugging Face one",
        description="Continue prompts with a trained model. On several processes, give each the "
        "distributed.* keys (key=value after the options) as jaxlm train takes them; process 0 prints.",
    )
    generate_parser.add_argument(
        "path",
        help="a Hugging Face model directory, a jaxlm run directory (its newest checkpoint) or a step of one",
    )
    prompt_source = generate_parser.add_mutually_exclusive_group(required=True)
    prompt_source.add_argument("--prompt", help="one prompt; its continuation streams to stdout")
    prompt_source.add_argument(
        "--prompt-file",
        help='.jsonl (a "prompt" per line) or .txt (a prompt per line); prints a JSON line per prompt',
    )
    generate_parser.add_argument(
        "--max-new-tokens", type=int, default=64, help="at most this many (default 64)"
    )
    model_default = "default: the model's generation_config.json, else"
    generate_parser.add_argument(
        "--temperature", type=float, help=f"divides the logits (0 is greedy; {model_default} 1)"
    )
    generate_parser.add_argument(
        "--top-k", type=int, help=f"draw among the k most likely tokens (0: all; {model_default} 0)"
    )
    generate_parser.add_argument(
        "--top-p",
        type=float,
        help=f"draw among the fewest tokens holding this probability (1: all; {model_default} 1)",
    )
    generate_parser.add_argument(
        "--greedy",
        action=argparse.BooleanOptionalAction,
        help="always the most likely token; --no-greedy samples where the model's generation_config.json "
        "says do_sample false (default: greedy where it says so and no --temperature, --top-k or --top-p "
        "is given)",
    )
    generate_parser.add_argument("--seed", type=int, default=0, help="the same seed draws the same text")
    generate_parser.add_argument(
        "--stop", action="append", metavar="STR", help="end a continuation before this text (repeatable)"
    )
    generate_parser.add_argument(
        "--batch-size", type=int, default=8, help="prompts decoded together (default 8)"
    )
    generate_parser.set_defaults(run=_generate, overrides=[])
    eval_parser = commands.add_parser(
        "eval", help="score a model: loss, perplexity and bits per byte on data; lm-eval-harness tasks"
    )
    eval_parser.add_argument(
        "path",
        help="a Hugging Face model directory, a jaxlm run directory (its newest checkpoint) or a step of one",
    )
    eval_parser.add_argument("--step", type=int, help="the checkpoint step of a run (default: the newest)")
    eval_parser.add_argument(
        "--data", metavar="FILE_OR_DIR", help=".txt/.jsonl/.parquet examples, each scored once"
    )
    eval_parser.add_argument("--tasks", metavar="TASK[,TASK...]", help="lm-eval tasks (needs the eval extra)")
    eval_parser.add_argument(
        "--num-fewshot", type=int, help="examples in each task prompt (default: the task's)"
    )
    eval_parser.add_argument(
        "--limit", type=_limit, help="at most this many examples per task (< 1: a fraction)"
    )
    eval_parser.add_argument("--include-path", metavar="DIR", help="a directory of lm-eval task YAML files")
    eval_parser.add_argument("--batch-size", type=int, default=8, help="rows scored together (default 8)")
    eval_parser.add_argument(
        "--max-length", type=int, help="tokens per task request (default: the model's context length)"
    )
    eval_parser.add_argument(
        "--bootstrap-iters",
        type=int,
        default=100000,
        help="lm-eval's resamples for standard errors (0: none)",
    )
    eval_parser.add_argument("--output", metavar="FILE", help="write the scores, config and versions as JSON")
    eval_parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="mesh.*, data.* (e.g. data.seq_len=2048), model.dtype",
    )
    eval_parser.set_defaults(run=_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unparsed = parser.parse_known_args(argv)
    # Overrides may follow options: `jaxlm plan CONFIG --topology v5e:2x2 model.remat=full`.
    unknown_options = [arg for arg in unparsed if arg.startswith("-")]
    if unknown_options:
        parser.error(f"unrecognized arguments: {' '.join(unknown_options)}")
    args.overrides = [*args.overrides, *unparsed]
    # JAX takes 75% of a GPU's memory for its allocator unless told otherwise; a 1B model's
    # step on one 80 GB H100 needs more. An explicit setting in the environment wins.
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
    setup_logging()
    try:
        import jaxlm.model  # noqa: F401 (registers the model families, whose sections configs validate against)

        return args.run(args)
    except UserError as error:
        process = _process_index()
        print(f"jaxlm[p{process}]: error: {error}", file=sys.stderr)
        # Work still in flight when the error came (Orbax's other reads of a damaged checkpoint,
        # say) fails again, from other threads, as the process exits: the line above said why.
        sys.stderr.flush()
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stderr.fileno())
        return 2
    except PreemptionGraceExpired as error:
        print(f"jaxlm[p{_process_index()}]: error: {error}", file=sys.stderr)
        sys.stderr.flush()
        # Orbax's threads are still writing the checkpoint the grace period gave up on; exiting
        # normally would wait for them, past the time the host has left.
        os._exit(1)
    except KeyboardInterrupt:  # one process; in a run of several, Ctrl-C is a preemption (distributed.py)
        print("jaxlm: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if _process_count() == 1:
            raise
        # In a run of several processes the traceback alone does not say which host it came from,
        # and a collective that fails because another process stopped first reads like a bug here
        # (gloo: "Received data size doesn't match expected size"; NCCL: "unhandled system error").
        log.exception("stopped by an error")
        print(f"jaxlm[p{_process_index()}]: error: {_last_line(error)}", file=sys.stderr)
        if _is_runtime_error(error):
            print(
                f"jaxlm[p{_process_index()}]: if another process of the run stopped or died first, its "
                "log says why; the run resumes from its last checkpoint with the same command",
                file=sys.stderr,
            )
        return 1


def _last_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"


def _is_runtime_error(error: BaseException) -> bool:
    import jax

    return isinstance(error, jax.errors.JaxRuntimeError)


def _process_count() -> int:
    import jax

    return jax.process_count() if jax.distributed.is_initialized() else 1


def _process_index() -> int:
    """The JAX process index, without starting a backend before jax.distributed is up."""
    import jax

    # Until jax.distributed starts (and in a single-process run, where it never does) the index
    # is 0, and asking JAX would start a backend that jax.distributed or jax_num_cpu_devices must
    # come before.
    return jax.process_index() if jax.distributed.is_initialized() else 0


if __name__ == "__main__":
    sys.exit(main())
