"""cnnmod: decompose a trained CNN classifier into one reusable, replaceable module per class."""

__version__ = "0.1.0"

from .checkpoint import load_model, save_checkpoint  # noqa: E402
from .compose import (ComposedClassifier, RepairOptions, compose, fit_composed_, load_composed,  # noqa: E402
                      load_modules, repair_, replace, save_composed)
from .data import Dataset, InputSpec, load_data  # noqa: E402
from .errors import CnnmodError  # noqa: E402
from .models import create_model, list_models  # noqa: E402
from .modules import (ChannelsOptions, Module, Observation, PaperOptions, build, decompose,  # noqa: E402
                      load_module, load_observation, observe, save_module, save_modules, save_observation)
from .training import TrainConfig, train  # noqa: E402

__all__ = [
    "ChannelsOptions", "CnnmodError", "ComposedClassifier", "Dataset", "InputSpec", "Module", "Observation",
    "PaperOptions", "RepairOptions", "TrainConfig", "build", "compose", "create_model", "decompose", "fit_composed_",
    "list_models", "load_composed", "load_data", "load_model", "load_module", "load_modules", "load_observation",
    "observe", "repair_", "replace", "save_checkpoint", "save_composed", "save_module", "save_modules", "save_observation",
    "train",
]
