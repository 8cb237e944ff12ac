"""What jaxlm declares in pyproject.toml: every package it imports, and TFDS and pyarrow only as
extras."""

import ast
import importlib.metadata
import os
import subprocess
import sys
import tomllib

from conftest import REPO, TINY
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

# Run as `python -c`: a finder first on sys.meta_path answers for a package as an interpreter
# without it does, then the CLI runs as `python -m jaxlm.cli` would.
WITHOUT = """
import runpy, sys

class Without:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == {package!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, Without())
runpy.run_module("jaxlm.cli", run_name="__main__", alter_sys=True)
"""


def run_without(package: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-c", WITHOUT.format(package=package), *args],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
    )  # fmt: skip


def imported_top_level_modules(package: str) -> set[str]:
    """The top-level names of every module imported anywhere in the package's source."""
    names = set()
    for path in (REPO / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name.partition(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.partition(".")[0])
    return names - set(sys.stdlib_module_names) - {package, "__future__"}


def declared(requirements: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(line).name) for line in requirements}


OPTIONAL = {"tensorflow_datasets": "tfds", "pyarrow": "parquet", "lm_eval": "eval"}  # module → its extra


def test_every_package_jaxlm_imports_is_declared_and_tfds_and_pyarrow_only_by_their_extras():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = declared(project["dependencies"])
    distributions = importlib.metadata.packages_distributions()
    undeclared = {
        module: distributions.get(module, ["not installed"])
        for module in imported_top_level_modules("jaxlm") - set(OPTIONAL)
        if not core & {canonicalize_name(name) for name in distributions.get(module, [])}
    }
    assert not undeclared, f"imported by jaxlm but not in [project] dependencies: {undeclared}"
    assert not core & {"tensorflow-datasets", "pyarrow"}
    assert declared(project["optional-dependencies"]["tfds"]) == {"tensorflow-datasets"}
    assert declared(project["optional-dependencies"]["parquet"]) == {"pyarrow"}


def test_data_tfds_without_tensorflow_datasets_is_one_line_naming_the_extra(tmp_path):
    result = run_without(
        "tensorflow_datasets",
        "train",
        "configs/tiny.yaml",
        *TINY,
        f"run.dir={tmp_path}",
        "data.tfds=wiki40b/en",
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert errors == [
        "jaxlm[p0]: error: data.tfds=wiki40b/en needs TensorFlow Datasets, which is not installed; "
        'pip install -e ".[tfds]" (or pip install "jaxlm[tfds]")'
    ], result.stderr


def test_parquet_documents_without_pyarrow_are_one_line_naming_the_extra(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a document"]}), tmp_path / "corpus.parquet")
    result = run_without(
        "pyarrow",
        "train",
        "configs/tiny.yaml",
        *TINY,
        f"run.dir={tmp_path}",
        f"data.path={tmp_path / 'corpus.parquet'}",
    )
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert errors == [
        f"jaxlm[p0]: error: {tmp_path / 'corpus.parquet'} is a Parquet file, which needs pyarrow, and it is "
        'not installed; pip install -e ".[parquet]" (or pip install "jaxlm[parquet]")'
    ], result.stderr
