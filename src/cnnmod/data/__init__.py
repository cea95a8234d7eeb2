"""Data sets: one entry point, ``load_data(spec)``, and the model's input specification."""

from .inputspec import InputSpec
from .sources import Dataset, Views, load_data, load_data_for

__all__ = ["Dataset", "InputSpec", "Views", "load_data", "load_data_for"]
