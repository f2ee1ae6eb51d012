"""Datasets of the project. Never imports models or tasks."""

from .errors import DataUnavailableError

__all__ = ["DataUnavailableError"]
