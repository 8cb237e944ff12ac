"""Hugging Face checkpoints in and out: `files` (a model directory, checked), `read` (config.json
and safetensors into a family's keys and sharded parameters), `write` (a jaxlm model back into
one, for transformers and vLLM). What is family-specific (names, layouts, config.json keys) is
the family's `ModelFamily.hf`."""
