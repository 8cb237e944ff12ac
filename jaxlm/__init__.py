"""jaxlm: pretrain and fine-tune language models on JAX device meshes."""

__version__ = "0.1.0"
