"""Data sets: one entry point, ``load_data(spec)``, and the model's input specification."""

from .inputspec import InputSpec
from .sources import Dataset, Views, load_data, load_data_for
from .stream import ImageFiles

__all__ = ["Dataset", "ImageFiles", "InputSpec", "Views", "load_data", "load_data_for"]
