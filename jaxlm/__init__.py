"""jaxlm: pretrain and fine-tune language models on JAX device meshes."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `jaxlm.load` and `jaxlm.generate` without importing JAX for `import jaxlm` alone.
    if name == "load":
        from jaxlm.inference.loading import load

        return load
    if name == "generate":
        from jaxlm.inference.generation import generate

        return generate
    raise AttributeError(f"module 'jaxlm' has no attribute {name!r}")
