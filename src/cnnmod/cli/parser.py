"""The command line's parser: every command, option, default and choice, checked at the edge.

Every numeric option is checked here by its argparse type: a bad value is one line naming the
option, exit code 2, before anything is loaded or written.
"""

from __future__ import annotations

import argparse
import textwrap

from .. import __version__
from ..options import KINDS, Kind, add_flags

DESCRIPTION = (
    "Decompose a trained CNN image classifier into one module per class (a small binary classifier: "
    "this class or not), then reuse modules (compose some into a new classifier, even across models) "
    "or replace a weak class's module with a better model's, without retraining.")
EPILOG = """a first session:
  cnnmod train --model smallcnn --data mnist5k --out model.safetensors
  cnnmod decompose model.safetensors --data mnist5k --out modules/
  cnnmod evaluate modules/ --data mnist5k
  cnnmod compose modules/3.safetensors modules/8.safetensors --out pair.safetensors
  cnnmod evaluate pair.safetensors --data mnist5k
run "cnnmod COMMAND --help" for the options of a command."""
class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors on one line (the usage itself is one --help away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except where there is none to show (None, False)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


COUNT, COUNT0 = KINDS["count"].parse, KINDS["count0"].parse
POSITIVE = KINDS["positive"].parse
PROBABILITY = Kind("a probability", low=0.0, high=1.0, low_open=True, high_open=True).parse


def _data_args(p: argparse.ArgumentParser, *, size: bool = False) -> None:
    p.add_argument("--data", required=True,
                   help="mnist5k, digits, an image folder (one sub-folder per class), a .tar(.gz) of one, "
                        "or a CIFAR-10/100 python folder")
    p.add_argument("--split", choices=["train", "test", "val", "all"], default=None,
                   help="which part of the data (named sets: train/test; folders: all, or train/val, the last "
                        "10%% of each class by file name)")
    if size:
        p.add_argument("--size", type=COUNT, nargs=2, metavar=("H", "W"), default=None,
                       help="image folders and archives: resize every image to H x W pixels while decoding (needed for "
                            "photos of mixed sizes)")


def _strategy_options(p: argparse.ArgumentParser) -> None:
    """One option per field of each strategy's options dataclass (modules/strategies.py)."""
    from ..modules.strategies import STRATEGIES

    for name, strategy in STRATEGIES.items():
        add_flags(p, strategy.options, label=f"{name} strategy: ")


def build_parser() -> argparse.ArgumentParser:
    from ..compose.repair import RepairOptions
    from ..models import list_models
    from ..modules.distill import DistillOptions
    from ..modules.observe import ObserveOptions
    from ..modules.strategies import STRATEGIES
    from ..training import TrainConfig

    parser = _Parser(prog="cnnmod", description=textwrap.fill(DESCRIPTION, 78), epilog=EPILOG, formatter_class=_Help)
    parser.add_argument("--version", action="version", version=f"cnnmod {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, help_text):
        return sub.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".",
                              formatter_class=_Help)

    p = command("train", "train a built-in architecture and write a checkpoint")
    p.add_argument("--model", required=True, choices=list_models(), help="the architecture")
    _data_args(p, size=True)
    p.add_argument("--val-split", default=None, help="also report accuracy on this split after each epoch")
    p.add_argument("--out", required=True, help="the checkpoint file to write (.safetensors)")
    add_flags(p, TrainConfig)
    p.add_argument("--no-bn", action="store_true", help="the BatchNorm-free variant (ResNets)")
    p.add_argument("--resume", action="store_true", help="continue from the last saved epoch")
    p.add_argument("--device", default="auto", help="where to train: auto, cpu, cuda or cuda:N")

    p = command("evaluate", "accuracy of a model, a composition or a single module on labelled images")
    p.add_argument("file", nargs="+",
                   help="a checkpoint, a composed file, a module folder, module files, or one module file "
                        "(judged alone: precision, recall, F1)")
    _data_args(p)
    p.add_argument("--classes", default=None,
                   help="comma-separated classes: evaluate as a classifier of these classes only (a model: argmax "
                        "over their logits, the fair baseline of a reuse; modules: these modules composed)")
    p.add_argument("--confusion", action="store_true", help="also print the confusion matrix (and put it in --json)")
    p.add_argument("--plot", default=None, metavar="FILE.png",
                   help="draw per-class accuracy and the confusion matrix into this PNG (needs matplotlib)")
    p.add_argument("--device", default="auto", help="where to run: auto, cpu, cuda or cuda:N")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = command("decompose", "write one module file per class of a checkpoint")
    p.add_argument("checkpoint", help="a cnnmod checkpoint (.safetensors)")
    _data_args(p)
    p.add_argument("--out", required=True,
                   help="folder for <class>.safetensors files: new, empty, or a module folder (modules of other "
                        "classes in it are kept, those of this run's classes replaced)")
    p.add_argument("--strategy", default="paper", choices=list(STRATEGIES),
                   help="; ".join(f"{name}: {strategy.description}" for name, strategy in STRATEGIES.items()))
    p.add_argument("--only", default=None,
                   help="comma-separated classes: build only their modules; the data needs only their images "
                        "(other classes present serve as negatives)")
    add_flags(p, ObserveOptions)
    _strategy_options(p)
    add_flags(p, DistillOptions)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run's statistics and distillation")
    p.add_argument("--device", default="auto",
                   help="where to run the statistics pass and the distillation: auto, cpu, cuda or cuda:N "
                        "(torchrun: one process per device)")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = command("export", "write a module, composed classifier or checkpoint as ONNX, or a module of a "
                          "decomposition folder as one self-contained file")
    p.add_argument("file", nargs="+", help="a module file, a composed file, a module folder or a checkpoint")
    to = p.add_mutually_exclusive_group(required=True)
    to.add_argument("--onnx", help="the ONNX file to write")
    to.add_argument("--module", help="the self-contained module file to write (the parent's tensors included), "
                                     "to give a module of a folder to someone else")

    p = command("inspect", "show what a checkpoint, module or composed file, or a module folder holds")
    p.add_argument("file", help="a cnnmod file, or a folder of module files (one row per module)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--metrics", action="store_true",
                   help="a module folder's modularity metrics: each module's kernel retention, the overlap of each "
                        "two modules' kernels; with --data, cohesion and coupling on images")
    p.add_argument("--data", default=None, help="--metrics: labelled images of the modules' classes")
    p.add_argument("--split", choices=["train", "test", "val", "all"], default=None,
                   help="which part of --data (default: its test split)")
    p.add_argument("--per-class", type=COUNT, default=50, help="--metrics: images per class of --data (default 50)")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="--metrics: draw the overlap matrix")

    p = command("compose", "compose two or more modules into one classifier file")
    p.add_argument("files", nargs="+", help="module files or module folders")
    p.add_argument("--out", required=True, help="the composed file to write (.safetensors)")
    p.add_argument("--rule", choices=["auto", "vote", "calibrated"], default="auto",
                   help="vote: the paper's rule; calibrated: calibrated scores (auto: vote for modules of one "
                        "parent, calibrated otherwise)")
    p.add_argument("--unknown-below", type=PROBABILITY, default=None,
                   help="answer 'unknown' when no module's calibrated probability reaches this")
    p.add_argument("--adapt-data", default=None,
                   help="continuous learning: re-run tangling identification of each module with this data's "
                        "other classes")
    p.add_argument("--adapt-split", default=None, choices=["train", "test", "val", "all"])
    p.add_argument("--fit-data", default=None,
                   help="fit the modules' calibrations jointly on this data's images of the composed classes "
                        "(2 scalars per module, no network training); implies the calibrated rule")
    p.add_argument("--fit-split", default=None, choices=["train", "test", "val", "all"])
    p.add_argument("--fit-per-class", type=COUNT, default=100, help="images per class for --fit-data")

    p = command("replace", "swap the module of one class in a module folder")
    p.add_argument("directory", help="the module folder")
    p.add_argument("--with", dest="new", required=True, help="the new module file (same class, any parent)")
    p.add_argument("--out", required=True,
                   help="the module folder to write (new, empty, a module folder, or the input folder itself)")
    p.add_argument("--data", default=None, help="labelled images of the composed classes, for --repair")
    p.add_argument("--split", choices=["train", "test", "val", "all"], default=None,
                   help="which part of --data (default: its train split; all of a folder without splits)")
    add_flags(p, RepairOptions)
    p.add_argument("--device", default="auto", help="--repair train: where to train: auto, cpu, cuda or cuda:N")

    p = command("import", "turn a .pt/.pth state dict into a checkpoint (any architecture cnnmod can trace)")
    p.add_argument("state_dict", help="the .pt/.pth file (read with weights_only=True: nothing is unpickled)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", choices=list_models(), help="a built-in architecture the weights belong to")
    which.add_argument("--arch", metavar="LIBRARY:NAME",
                       help="torchvision:NAME or timm:NAME (needs that package); the checkpoint stores the layer "
                            "graph, so loading it needs neither the package nor its code")
    p.add_argument("--data", default=None,
                   help="labelled images: class names and the accuracy to report (needed with --model, which "
                        "also measures the input normalisation on them)")
    p.add_argument("--split", choices=["train", "test", "val", "all"], default=None, help="which part of --data")
    p.add_argument("--size", type=COUNT, nargs=2, metavar=("H", "W"), default=None,
                   help="--model: resize folder images while decoding; --arch: the model's input size (default: "
                        "timm's pretrained configuration, 224 x 224 for torchvision)")
    p.add_argument("--mean", type=float, nargs="+", default=None,
                   help="--arch: per-channel mean of the input normalisation, on the 0-1 scale (default: timm's "
                        "configuration, ImageNet's for torchvision)")
    p.add_argument("--std", type=POSITIVE, nargs="+", default=None, help="--arch: per-channel standard deviation")
    p.add_argument("--classes", default=None,
                   help="--arch: comma-separated class names, in the model's output order (default: --data's "
                        "classes when they are as many, else 0..K-1)")
    p.add_argument("--no-bn", action="store_true", help="the BatchNorm-free variant (ResNets)")
    p.add_argument("--out", required=True, help="the checkpoint file to write (.safetensors)")

    p = command("demo", "the whole pipeline on the embedded MNIST digits")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--epochs", type=COUNT, default=4, help="training epochs of the demo's model")
    return parser
