"""Step 6: compose modules into a classifier, replace a module, and their files."""

from .composed import ComposedClassifier, compose, replace
from .fit import fit_composed_
from .io import load_classifier, load_composed, load_modules, save_composed
from .repair import RepairOptions, repair_

__all__ = ["ComposedClassifier", "compose", "fit_composed_", "load_classifier", "load_composed", "load_modules",
           "repair_", "RepairOptions", "replace", "save_composed"]
