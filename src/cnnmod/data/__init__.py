"""Data sets: one entry point, ``load_data(spec)``, and the model's input specification."""

from .inputspec import InputSpec
from .sources import Dataset, load_data

__all__ = ["Dataset", "InputSpec", "load_data"]
