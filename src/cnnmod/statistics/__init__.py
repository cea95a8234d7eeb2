"""Step 2: one pass over the data, counting per class how often each observed element is > 0."""

from .collect import ActivationStats, collect_statistics, observed_layers
from .sampling import Sample, plain_pass, select_sample

__all__ = ["ActivationStats", "Sample", "collect_statistics", "observed_layers", "plain_pass", "select_sample"]
