"""Errors of the data layer that the CLI turns into one clear message (no traceback, non-zero exit)."""

from __future__ import annotations


class DataUnavailableError(Exception):
    """A dataset (or the tokenizer it needs) cannot be read: offline, missing files, wrong path.

    The message is written for the user: it names the dataset and the options that fix it (`data.path`, the token
    cache directory). The CLI prints it and exits with a non-zero status without a traceback.
    """
