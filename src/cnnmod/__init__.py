"""cnnmod: decompose a trained CNN classifier into one reusable, replaceable module per class."""

__version__ = "0.1.0"

from .checkpoint import load_model, save_checkpoint  # noqa: E402
from .data import Dataset, InputSpec, load_data  # noqa: E402
from .errors import CnnmodError  # noqa: E402
from .models import create_model, list_models  # noqa: E402
from .training import TrainConfig, train  # noqa: E402

__all__ = [
    "CnnmodError", "Dataset", "InputSpec", "TrainConfig", "create_model", "list_models",
    "load_data", "load_model", "save_checkpoint", "train",
]
