"""Typed errors raised by the library; only the CLI turns them into exit codes."""


class BatchclsError(Exception):
    """A user-facing problem: the message says what went wrong and what to do."""


class ModelError(BatchclsError):
    """The model bundle is missing, unreadable or incomplete."""


class InputError(BatchclsError):
    """The input folder, file or list cannot be used."""


class OutputError(BatchclsError):
    """The output cannot be written (exists, not writable, wrong schema for resume)."""
