"""What every benchmark shares: logs on stderr, one JSON line of figures on stdout, and a user
error (bad config, data, override) as one line and exit status 2."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jaxlm.cli import setup_logging
from jaxlm.errors import UserError


def report(measure: Callable[[], dict[str, Any]]) -> int:
    """Run `measure` and print its figures as one JSON line; the script's exit status."""
    setup_logging()
    try:
        figures = measure()
    except UserError as error:
        print(f"{Path(sys.argv[0]).stem}: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(figures))
    return 0


def compiled_memory(memory: Any) -> dict[str, int]:
    """XLA's memory analysis of a compiled step (`compiled.memory_analysis()`): argument, output,
    aliased (donated) and temporary bytes, and their peak, arguments + outputs − aliased +
    temporaries."""
    peak = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes
    )
    return {
        "argument_bytes": memory.argument_size_in_bytes,
        "output_bytes": memory.output_size_in_bytes,
        "alias_bytes": memory.alias_size_in_bytes,
        "temp_bytes": memory.temp_size_in_bytes,
        "peak_bytes": peak,
    }
