"""Generation speed on one device: prefill and decode tokens/s at each batch size, decoding with
the KV cache against recomputing the whole sequence for every token, and transformers' figures
for the same model shapes where transformers (with torch) is importable.

- prefill: `jaxlm.inference.generation.complete` with one new token, B prompts of --prompt-tokens random
  ids each: B × prompt tokens / its time.
- decode: the same with --new-tokens new tokens; the extra (new tokens − 1) × B tokens over the
  extra time. That is the generation loop as users run it: the jitted step, the donated state,
  and the host reading each token and turning it into text.
- recompute: a jitted forward over a row of prompt + new tokens (the whole context) for every
  token, as generation without a cache would run; `cache_speedup` = batch-1 decode tokens/s ÷
  recompute tokens/s.
- transformers: the family's own class of the same shapes (the config.json `jaxlm export-hf`
  writes; random weights, float32, its default attention and CPU threads):
  `generate(do_sample=False)` with 1 and with --new-tokens tokens, timed the same way.

- hf_io: the model's import (`jaxlm.load` of a Hugging Face directory) and export (`jaxlm
  export-hf`) times, and transformers' load time where installed, as bench/hf_io.py measures them.

Every figure is the median of --repeats timed calls after one untimed call (which compiles).
Prints one JSON line to stdout; logs go to stderr.

    python bench/generate.py configs/small_20m.yaml data.seq_len=512 --batch-sizes 1 8
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import hf_io  # bench/hf_io.py: the import and export times
import jax
import jax.numpy as jnp
import numpy as np
from report import report

from jaxlm.config import Config, load_config
from jaxlm.data.tokenizers import load_tokenizer
from jaxlm.errors import UserError
from jaxlm.inference import generation
from jaxlm.inference.loading import Loaded
from jaxlm.model import registry
from jaxlm.training.setup import build_model, count_params

log = logging.getLogger("jaxlm")


def median_time(call: Callable[[], Any], repeats: int) -> float:
    """Median seconds of `repeats` calls, after one untimed call."""
    call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def rates(
    time_one: float, time_all: float, batch: int, prompt_tokens: int, new_tokens: int
) -> dict[str, float]:
    """Prefill and decode tokens/s from the times of a generation of 1 and of `new_tokens` tokens."""
    return {
        "prefill_tokens_per_s": batch * prompt_tokens / time_one,
        "decode_tokens_per_s": batch * (new_tokens - 1) / (time_all - time_one),
        "prefill_s": time_one,
        "generate_s": time_all,
    }


def jaxlm_figures(loaded: Loaded, prompts: np.ndarray, new_tokens: int, repeats: int) -> dict[str, float]:
    def run(tokens: int) -> Callable[[], Any]:
        return lambda: generation.complete(loaded, list(prompts), max_new_tokens=tokens, greedy=True)

    batch, prompt_tokens = prompts.shape
    return rates(
        median_time(run(1), repeats), median_time(run(new_tokens), repeats), batch, prompt_tokens, new_tokens
    )


def recompute_tokens_per_s(loaded: Loaded, context: int, repeats: int) -> float:
    """Tokens/s of generating each token by a forward pass over the whole context, no cache."""
    positions = jnp.arange(context)[None]
    tokens = jnp.zeros((1, context), jnp.int32)
    forward = jax.jit(
        lambda params, tokens: loaded.model()(tokens, positions, jnp.ones_like(tokens)).logits[:, -1]
    )
    return 1 / median_time(lambda: np.asarray(jnp.argmax(forward(loaded.params, tokens), -1)), repeats)


def transformers_figures(
    config: Config, prompts: np.ndarray, new_tokens: int, repeats: int
) -> dict[str, Any]:
    import torch
    import transformers

    # The family's own Hugging Face class of the same shapes (config.json as export-hf writes it).
    hf = registry.family_of(config.model).hf.config_to_hf(config.model, config.data.seq_len)
    settings = {key: value for key, value in hf.items() if key not in ("architectures", "model_type")}
    hf_config = transformers.AutoConfig.for_model(hf["model_type"], **settings)
    hf_model = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
    input_ids = torch.from_numpy(prompts.astype(np.int64))

    def run(tokens: int) -> Callable[[], Any]:
        def generate() -> Any:
            with torch.inference_mode():
                return hf_model.generate(
                    input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=tokens,
                    min_new_tokens=tokens, do_sample=False, pad_token_id=0,
                )  # fmt: skip

        return generate

    batch, prompt_tokens = prompts.shape
    figures = rates(
        median_time(run(1), repeats), median_time(run(new_tokens), repeats), batch, prompt_tokens, new_tokens
    )
    return {"threads": torch.get_num_threads(), **figures}


def transformers_versions() -> dict[str, Any] | None:
    """transformers' and torch's versions, or None where this interpreter cannot import them."""
    try:
        import torch
        import transformers
    except ImportError:
        return None
    return {"version": transformers.__version__, "torch": torch.__version__}


def benchmark(
    config_path: str,
    overrides: Sequence[str],
    batch_sizes: Sequence[int],
    new_tokens: int,
    prompt_tokens: int,
    repeats: int,
) -> dict[str, Any]:
    config = load_config(
        config_path, [*overrides, "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1", "train.global_batch_size=1"]
    )
    context = prompt_tokens + new_tokens
    if context > config.data.seq_len:
        raise UserError(
            f"--prompt-tokens {prompt_tokens} + --new-tokens {new_tokens} exceed data.seq_len={config.data.seq_len}, "
            f"the model's context; set data.seq_len={context} or more"
        )
    device = jax.devices()[0]
    setup = build_model(config, [device])
    tokenizer = load_tokenizer(config.data)
    loaded = Loaded(config, setup, setup.init_params(jax.random.key(0)), tokenizer, eos_ids=())
    rng = np.random.default_rng(0)
    figures: dict[str, Any] = {
        "config": config_path,
        "overrides": list(overrides),
        "device": {"platform": device.platform, "kind": device.device_kind},
        "jax": jax.__version__,
        "family": config.model.family,
        "params": count_params(setup.abstract_params),
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "jaxlm": {},
        "transformers": transformers_versions(),
    }
    for batch in batch_sizes:
        prompts = rng.integers(0, tokenizer.vocab_size, (batch, prompt_tokens), dtype=np.int32)
        log.info("batch %d: jaxlm", batch)
        figures["jaxlm"][str(batch)] = jaxlm_figures(loaded, prompts, new_tokens, repeats)
        if figures["transformers"] is not None:
            log.info("batch %d: transformers", batch)
            figures["transformers"][str(batch)] = transformers_figures(config, prompts, new_tokens, repeats)
    log.info("recomputing the whole sequence per token")
    recompute = recompute_tokens_per_s(loaded, context, repeats)
    one = figures["jaxlm"].get("1")
    figures["recompute"] = {"context": context, "tokens_per_s": recompute}
    figures["cache_speedup"] = one["decode_tokens_per_s"] / recompute if one else None
    log.info("importing and exporting the model as a Hugging Face directory")
    figures["hf_io"] = hf_io.measure(
        argparse.Namespace(config=config_path, overrides=list(overrides), repeats=repeats, shard_mb=64)
    )
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="configs/small_20m.yaml", help="YAML config")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="prompts per batch")
    parser.add_argument("--prompt-tokens", type=int, default=448, help="tokens per prompt")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per prompt")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls of each; the median counts")
    args = parser.parse_intermixed_args(argv)
    if args.new_tokens < 2 or args.prompt_tokens < 1 or args.repeats < 1:
        parser.error("--new-tokens must be at least 2, --prompt-tokens and --repeats at least 1")
    return report(
        lambda: benchmark(
            args.config, args.overrides, args.batch_sizes, args.new_tokens, args.prompt_tokens, args.repeats
        )
    )


if __name__ == "__main__":
    sys.exit(main())
