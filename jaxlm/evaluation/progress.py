"""The progress bar of evaluations, shared by `evaluate` and `lm_eval_adapter`."""

import jax


def progress_bar(show: bool = True):
    """A rich progress bar on stderr (done/total, rate, time left), shown by process 0 only:
    start it with `with`, add a task, advance it."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"),
        MofNCompleteColumn(),
        BarColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not show or jax.process_index() != 0,
    )
