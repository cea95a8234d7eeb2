"""Step 4: build one module per class (strategies), and step 5: module files."""

from .decompose import decompose
from .io import load_module, save_module
from .module import Module
from .strategies import STRATEGIES

__all__ = ["Module", "STRATEGIES", "decompose", "load_module", "save_module"]
