"""Step 2: one pass over the data, recording per class which observed elements were ever non-zero (bits)."""

from .collect import ActivationStats, collect_statistics, observed_layers
from .sampling import Sample, plain_pass, select_sample

__all__ = ["ActivationStats", "Sample", "collect_statistics", "observed_layers", "plain_pass", "select_sample"]
