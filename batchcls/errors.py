"""Typed errors raised by the library; only the CLI turns them into exit codes."""


class BatchclsError(Exception):
    """A user-facing problem: the message says what went wrong and what to do."""


class ModelError(BatchclsError):
    """The model bundle is missing, unreadable or incomplete."""


class InputError(BatchclsError):
    """The input folder, file or list cannot be used."""


class OutputError(BatchclsError):
    """The output cannot be written (exists, not writable, wrong schema for resume)."""


def first_line(e: BaseException) -> str:
    """``Type: first line of the message`` (or just ``Type``).

    ONNX Runtime, torch and Ray put pages of context (stacks, graphs, hints) into one exception; a row's
    reason and a user's error are one line, and ``--verbose`` still shows the rest.
    """
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


class GpuFailure(ModelError):
    """The GPU ran out of memory or is in a sticky error state: the run stops at the batch it was on (the
    rows already written stay, so ``--resume`` redoes only what is left) instead of writing error rows."""
