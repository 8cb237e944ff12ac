"""Model families (Flax NNX). `registry` says what a family provides; each family registers here."""

from jaxlm.model import llama, registry

registry.register(llama.FAMILY)
