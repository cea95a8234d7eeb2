"""Step 4: observe a model once, build one module per class (strategies); step 5: module files."""

from .decompose import build, decompose
from .io import load_module, save_module
from .module import Module
from .observation_io import load_observation, save_observation
from .observe import Observation, observe
from .pipeline import save_modules
from .strategies import STRATEGIES, ChannelsOptions, PaperOptions

__all__ = ["ChannelsOptions", "Module", "Observation", "PaperOptions", "STRATEGIES", "build", "decompose",
           "load_module", "load_observation", "observe", "save_module", "save_modules", "save_observation"]
