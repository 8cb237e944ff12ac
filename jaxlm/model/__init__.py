"""Model families (Flax NNX). `registry` says what a family provides; each family registers here."""

from jaxlm.model import deepseek_v3, gemma3, gpt2, llama, mistral, mixtral, olmoe, qwen3, qwen3_moe, registry

for family in (
    llama.FAMILY,
    mistral.FAMILY,
    qwen3.FAMILY,
    gemma3.FAMILY,
    gpt2.FAMILY,
    mixtral.FAMILY,
    qwen3_moe.FAMILY,
    olmoe.FAMILY,
    deepseek_v3.FAMILY,
):
    registry.register(family)
