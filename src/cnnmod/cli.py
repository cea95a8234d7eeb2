"""The command line: a thin shell over the library, ``main(argv) -> exit code``.

Every numeric option is checked here, at the edge, by its argparse type: a bad value is one
line naming the option, exit code 2, before anything is loaded or written.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import textwrap

from . import __version__
from .errors import CnnmodError

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
RULES = {"vote": "the paper's vote: argmax of the module margins",
         "calibrated": "calibrated scores: argmax of each module's calibrated log-odds"}


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


def _number(kind, *, low=None, high=None, low_open=False, high_open=False, what="a number"):
    """An argparse type: ``kind`` (int or float) within [low, high] (open ends where asked)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, found {text!r}") from None
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high or value != value:  # value != value: NaN
            lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
            hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
            raise argparse.ArgumentTypeError(f"expected {what} {' and '.join(x for x in (lo, hi) if x)}, found {text}")
        return value
    return parse


COUNT = _number(int, low=1, what="a whole number")
COUNT0 = _number(int, low=0, what="a whole number")
SHARE = _number(float, low=0.0, high=1.0, low_open=True, what="a share")
SHARE0 = _number(float, low=0.0, high=1.0, what="a share")
POSITIVE = _number(float, low=0.0, low_open=True, what="a number")
PROBABILITY = _number(float, low=0.0, high=1.0, low_open=True, high_open=True, what="a probability")


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


def _strategy_default(strategy: str, option: str):
    from .modules.strategies import STRATEGIES

    return inspect.signature(STRATEGIES[strategy]).parameters[option].default


def build_parser() -> argparse.ArgumentParser:
    from .models import list_models

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
    p.add_argument("--epochs", type=COUNT, default=10, help="passes over the training images")
    p.add_argument("--batch-size", type=COUNT, default=128, help="images per step")
    p.add_argument("--lr", type=POSITIVE, default=0.1, help="peak learning rate (SGD, cosine schedule)")
    p.add_argument("--warmup", type=COUNT0, default=0, help="epochs of linear learning-rate warm-up")
    p.add_argument("--seed", type=int, default=0, help="fixes weights, batch order and augmentation")
    p.add_argument("--augment", default="auto", choices=["auto", "crop-flip", "crop", "none"],
                   help="auto: crop-flip for colour images, none for grey")
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
    p.add_argument("--strategy", default="paper", choices=["paper", "channels"],
                   help="paper: Pan & Rajan's masks on the whole model; channels: whole channels removed, "
                        "physically smaller modules")
    p.add_argument("--only", default=None,
                   help="comma-separated classes: build only their modules; the data needs only their images "
                        "(other classes present serve as negatives)")
    p.add_argument("--positives", type=COUNT, default=1000, help="images per class observed (paper: 1000)")
    p.add_argument("--negatives-per-class", type=COUNT0, default=None,
                   help="negatives of each other class (default: positives // (classes - 1), 1:1)")
    p.add_argument("--delta", type=POSITIVE, default=None,
                   help=f"paper strategy: MC-BLN threshold (default: {_strategy_default('paper', 'delta')})")
    ch = "channels strategy: "
    p.add_argument("--keep", type=SHARE, default=None,
                   help=ch + f"share of each channel space a module keeps (default: {_strategy_default('channels', 'keep')})")
    p.add_argument("--trunk", type=SHARE0, default=None,
                   help=ch + "share of the parent's MACs, from the input, pruned alike for every class, so that "
                             "composed modules run it once (default: 0, no trunk)")
    p.add_argument("--trunk-keep", type=SHARE, default=None,
                   help=ch + "share of each trunk channel space kept (default: --keep, or --retain)")
    p.add_argument("--keep-streams", action="store_true", default=None,
                   help=ch + "keep residual streams whole, prune only inside blocks")
    p.add_argument("--score", default=None, choices=["rate", "energy"],
                   help=ch + "rank channels by firing rate per class or by the error removing them causes "
                             f"(default: {_strategy_default('channels', 'score')})")
    p.add_argument("--retain", type=SHARE, default=None,
                   help=ch + "instead of --keep, keep per space the best channels holding this share of the "
                             "space's total score")
    p.add_argument("--multiple", type=COUNT, default=None,
                   help=ch + "round each space's kept channels to a multiple of this (8: the block size of CPU "
                             "convolution kernels, so that every removed channel saves time; default: 1)")
    p.add_argument("--sample-images", type=COUNT, default=None,
                   help=ch + "images of the observed sample that channels are scored and layers re-fitted on "
                             "(more: closer re-fits, slower; default: 256)")
    p.add_argument("--seed", type=int, default=0, help="fixes which images are observed")
    p.add_argument("--batch-size", type=COUNT, default=256, help="images per batch of the statistics pass")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run's statistics")
    p.add_argument("--device", default="auto", help="where to run the statistics pass: auto, cpu, cuda or cuda:N (torchrun: one process per device)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="bf16: autocast statistics pass (faster on GPUs; may change masks, see BENCHMARKS.md)")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = command("export", "write a module, composed classifier or checkpoint as ONNX")
    p.add_argument("file", nargs="+", help="a module file, a composed file, a module folder or a checkpoint")
    p.add_argument("--onnx", required=True, help="the ONNX file to write")

    p = command("inspect", "show what a checkpoint, module or composed file, or a module folder holds")
    p.add_argument("file", help="a cnnmod file, or a folder of module files (one row per module)")
    p.add_argument("--json", action="store_true", help="print one JSON object")

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


def main(argv: list[str] | None = None) -> int:
    """Run the command line on ``argv``; return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed its one-line usage error (or --help, --version)
        return int(e.code or 0)
    try:
        return COMMANDS[args.command](args)
    except CnnmodError as e:
        print(f"cnnmod: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head`: not an error of ours
        return 0
    except KeyboardInterrupt:
        print("cnnmod: interrupted; nothing half-written was left behind.", file=sys.stderr)
        return 130


def run() -> None:
    sys.exit(main())


def _plural(n: int, word: str) -> str:
    """"1 module", "2 modules", "3 classes"."""
    return f"{n:,} {word}{'' if n == 1 else 'es' if word.endswith('s') else 's'}"


def _names(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [c.strip() for c in text.split(",") if c.strip()]
    if not names:
        raise CnnmodError(f"expected comma-separated class names, found {text!r}.")
    return names


def _rounded(value, digits: int = 6):
    """JSON numbers as they mean: floats to ``digits`` significant digits (0.98, not 0.9800000190734863)."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, dict):
        return {k: _rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v, digits) for v in value]
    return value


def _print_json(obj) -> None:
    print(json.dumps(_rounded(obj), sort_keys=True))


def _size(args):
    return tuple(args.size) if getattr(args, "size", None) else None


def cmd_train(args) -> int:
    from .data import load_data
    from .training import TrainConfig, train

    data = load_data(args.data, args.split, default_split="train", size=_size(args))
    val = load_data(args.data, args.val_split, size=_size(args)) if args.val_split else None
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                         warmup=args.warmup, augment=args.augment)
    meta = train(args.model, data, args.out, config, val=val, resume=args.resume,
                 arch_args={"bn": False} if args.no_bn else None, device=args.device)
    acc = meta["accuracy"]
    print(f"wrote {args.out}: {acc['split']} top-1 {acc['top1']:.4f}, top-5 {acc['top5']:.4f} (n={acc['n']})")
    return 0


def cmd_evaluate(args) -> int:
    from .compose import compose, load_classifier
    from .data import load_data_for
    from .distributed import resolve_device
    from .evaluate import evaluate_model, evaluate_module, evaluate_scores

    device = resolve_device(args.device)
    wanted = _names(args.classes)
    kind, clf = load_classifier(args.file)
    if kind == "module":
        if args.confusion or args.plot:
            raise CnnmodError("expected a classifier for --confusion or --plot, found a single module (judged by "
                              "precision and recall; compose modules to see a confusion matrix).")
        data = load_data_for(args.data, args.split, [clf.input_spec], default_split="test")
        result = evaluate_module(clf, data.only(wanted) if wanted else data)
        if args.json:
            _print_json(dict(result, kind="module"))
        else:
            c = result["counts"]
            print(f"module {result['class']!r} alone, its class against the other {_plural(c['fp'] + c['tn'], 'image')}:")
            print(f"precision {result['precision']:.4f}  recall {result['recall']:.4f}  F1 {result['f1']:.4f}  "
                  f"accuracy {result['accuracy']:.4f}  n={result['n']} ({result['positives']} of its class)")
        return 0

    confusion = args.confusion or args.plot is not None
    if kind == "model":
        classes = clf.cnnmod_meta["classes"]
        _check_known(wanted, classes, "the model's")
        data = load_data_for(args.data, args.split, [clf.input_spec], default_split="test")
        if wanted:
            data = data.only(wanted)
        clf.to(device)
        result = evaluate_model(clf, data, device=device, restrict=wanted, confusion=confusion)
        what = (f"the model restricted to {', '.join(wanted)} (argmax over their logits)" if wanted else
                f"the model ({_plural(len(classes), 'class')})")
        result.update(kind="model", classes=wanted or classes)
    else:
        if wanted:
            _check_known(wanted, clf.classes, "the composition's")
            clf = compose([m for m in clf.modules_ if m.class_name in wanted], rule=clf.rule,
                          unknown_below=clf.unknown_below)
        data = load_data_for(args.data, args.split, [m.input_spec for m in clf.modules_], default_split="test")
        known = [c for c in data.classes if c in clf.classes]
        if not known:
            raise CnnmodError(f"expected images of the composed classes ({', '.join(clf.classes[:12])}) in the data, "
                              f"found only {', '.join(data.classes[:12])}.")
        left_out = 0
        if len(known) < len(data.classes):  # images of classes no module knows: not this classifier's task
            kept = data.only(known)
            left_out, data = len(data) - len(kept), kept
        clf.to(device)
        result = evaluate_scores(lambda x: clf.score_images(_to(x, device)).cpu(), data, clf.classes,
                                 reject_below=clf.reject_below(), confusion=confusion)
        what = f"{_plural(len(clf.classes), 'module')} composed, rule {clf.rule} ({RULES[clf.rule]})"
        result.update(kind="composed", classes=clf.classes, rule=clf.rule, left_out=left_out)
    if args.plot:
        from .plot import plot_evaluation

        plot_evaluation(result, args.plot, title=f"{' '.join(args.file)}: {what}")
    if not args.confusion:
        result.pop("confusion", None)
    if args.json:
        _print_json(result)
    else:
        _print_result(result, what)
    return 0


def _to(x, device):
    return {k: v.to(device) for k, v in x.items()} if isinstance(x, dict) else x.to(device)


def _check_known(wanted: list[str] | None, classes: list[str], whose: str) -> None:
    unknown = [c for c in wanted or [] if c not in classes]
    if unknown:
        raise CnnmodError(f"expected --classes among {whose} classes ({', '.join(classes[:12])}"
                          f"{', ...' if len(classes) > 12 else ''}), found {', '.join(map(repr, unknown[:5]))}.")


def _print_result(result: dict, what: str) -> None:
    print(what)
    print(f"top-1 {result['top1']:.4f}  top-5 {result['top5']:.4f}  n={result['n']}"
          + (f"  unknown {result['unknown']:.4f}" if "unknown" in result else ""))
    if result.get("left_out"):
        print(f"({_plural(result['left_out'], 'image')} of classes no module knows left out)")
    width = max(len(c) for c in result["per_class"])
    for name, acc in result["per_class"].items():
        print(f"  {name:<{width}}  {acc:.4f}")
    if "confusion" in result:
        c = result["confusion"]
        print("confusion matrix (rows: true class, columns: answer)")
        cols = [max(len(p), *(len(str(row[j])) for row in c["matrix"])) for j, p in enumerate(c["predicted"])]
        rw = max(len(t) for t in c["true"])
        print(" " * (rw + 2) + "  ".join(f"{p:>{w}}" for p, w in zip(c["predicted"], cols)))
        for t, row in zip(c["true"], c["matrix"]):
            print(f"  {t:<{rw}}" + "".join(f"  {v:>{w}}" for v, w in zip(row, cols)))


CHANNELS_OPTIONS = ("keep", "trunk", "trunk_keep", "keep_streams", "score", "retain", "multiple", "sample_images")


def _strategy_options(args) -> dict:
    """The options of the chosen strategy; an option of the other strategy is an error, not ignored."""
    given = [k for k in CHANNELS_OPTIONS if getattr(args, k) is not None]
    if args.strategy == "paper":
        if given:
            raise CnnmodError(f"expected --{given[0].replace('_', '-')} only with --strategy channels, found it with "
                              "--strategy paper (which keeps whole layers and masks elements).")
        return {} if args.delta is None else {"delta": args.delta}
    if args.delta is not None:
        raise CnnmodError("expected --delta only with --strategy paper, found it with --strategy channels.")
    options = {k: getattr(args, k) for k in given if k != "keep_streams"}
    if args.keep_streams:
        options["streams"] = False
    return options


def cmd_decompose(args) -> int:
    from .modules.pipeline import decompose_to_directory

    summary = decompose_to_directory(args.checkpoint, args.data, args.out, split=args.split,
                                     strategy=args.strategy, positives=args.positives,
                                     negatives_per_class=args.negatives_per_class, seed=args.seed,
                                     batch_size=args.batch_size, progress=not args.json, only=_names(args.only),
                                     resume=args.resume, device=args.device, precision=args.precision,
                                     **_strategy_options(args))
    if summary["rank"] != 0:
        return 0  # rank 0 reports for the group
    if args.json:
        _print_json(summary)
        return 0
    kept = f"; kept {_plural(len(summary['kept']), 'other module')} already there" if summary["kept"] else ""
    print(f"wrote {_plural(len(summary['modules']), 'module')} to {args.out} in {summary['seconds']:.1f} s "
          f"({_plural(summary['images'], 'image')} observed{kept})")
    if args.only:
        neg = summary["negatives_from"]
        others = {c: n for c, n in neg.items() if c not in summary["modules"]}
        print(f"  negatives: {_plural(sum(neg.values()), 'image')}, of which {sum(others.values()):,} from "
              f"{_plural(len(others), 'other class')}"
              + (f" ({', '.join(others)})" if 0 < len(others) <= 12 else ""))
    for name, m in summary["modules"].items():
        if "params_fraction" in m:  # the channels strategy
            print(f"  {name:<12} keeps {m['share_kept']:.4f} of the prunable channels: "
                  f"{m['params_fraction']:.3f} of the parameters, {m['macs_fraction']:.3f} of the MACs, "
                  f"{m['file_bytes']:,} bytes on disk")
        else:
            print(f"  {name:<12} keeps {m['share_kept']:.4f} of the observed elements, {m['file_bytes']:,} bytes on disk")
    return 0


def cmd_export(args) -> int:
    from .export import export_onnx

    info = export_onnx(args.file, args.onnx)
    print(f"wrote {args.onnx}: {info['kind']} ({_plural(len(info['classes']), 'class')}), "
          f"input uint8 {info['input']['channels']}x{info['input']['size'][0]}x{info['input']['size'][1]}")
    return 0


def cmd_inspect(args) -> int:
    from .inspect import describe

    text, meta = describe(args.file)
    if args.json:
        _print_json(meta)
    else:
        print(text)
    return 0


def cmd_compose(args) -> int:
    from pathlib import Path

    import torch

    from .compose import compose, load_modules, save_composed
    from .data import load_data_for
    from .modules import load_module

    modules = []
    for f in args.files:
        modules.extend(load_modules(f) if Path(f).is_dir() else [load_module(f)])
    if len(modules) < 2:
        raise CnnmodError(f"expected at least two modules to compose, found {len(modules)} (evaluate a single "
                          "module directly: cnnmod evaluate FILE --data ...).")
    if args.fit_data and args.rule == "vote":
        raise CnnmodError("expected the calibrated rule with --fit-data (it fits calibrations), found --rule vote.")
    inputs = [m.input_spec for m in modules]
    if args.adapt_data:
        from .modules.adapt import adapt_

        data = load_data_for(args.adapt_data, args.adapt_split, inputs, default_split="train")
        for m in modules:
            foreign = torch.tensor([c != m.class_name for c in data.classes])[data.labels]
            adapt_(m, data.images_for(m.input_spec)[foreign])
    if args.fit_data:
        from .compose.fit import fit_composed_

        used = fit_composed_(modules, load_data_for(args.fit_data, args.fit_split, inputs, default_split="train"),
                             per_class=args.fit_per_class)
        print(f"fitted the {len(modules)} modules' calibrations jointly on {used:,} images of {args.fit_data}")
    rule = "calibrated" if args.fit_data else args.rule
    clf = compose(modules, rule=rule, unknown_below=args.unknown_below)
    save_composed(clf, args.out)
    print(f"wrote {args.out}: {len(clf.classes)} classes ({', '.join(clf.classes)}), rule {clf.rule} "
          f"({RULES[clf.rule]}), {Path(args.out).stat().st_size:,} bytes")
    c = clf.cost()
    if c["trunk_macs"]:
        print(f"  one shared trunk per parent: {c['trunk_params']:,} parameters, {c['trunk_macs']:,} MACs per image; "
              f"in all {c['macs']:,} MACs per image (modules one by one: {c['separate_macs']:,})")
    return 0


def cmd_replace(args) -> int:
    from .compose import load_modules, replace
    from .modules import load_module
    from .modules.pipeline import write_modules

    new = load_module(args.new)
    modules = replace(load_modules(args.directory), new)
    write_modules(modules, args.out)
    print(f"wrote {args.out}: module {new.class_name!r} replaced by {args.new}")
    return 0


def cmd_import(args) -> int:
    from .data import load_data
    from .importing import import_library_model, import_state_dict

    if args.model:
        if args.data is None:
            raise CnnmodError("expected --data with --model (its classes and input normalisation), found none.")
        data = load_data(args.data, args.split, default_split="train", size=_size(args))
        meta = import_state_dict(args.state_dict, args.model, data, args.out,
                                 arch_args={"bn": False} if args.no_bn else None)
    else:
        from .data import load_data_for

        def data(spec):  # decoded to the model's own input, known once the model is built
            return load_data_for(args.data, args.split, [spec], default_split="train")
        meta = import_library_model(args.state_dict, args.arch, args.out, data=data if args.data else None,
                                    size=_size(args),
                                    mean=tuple(args.mean) if args.mean else None,
                                    std=tuple(args.std) if args.std else None, classes=_names(args.classes))
    acc = meta.get("accuracy")
    print(f"wrote {args.out}" + (f": top-1 {acc['top1']:.4f} on the given data (n={acc['n']})" if acc else ""))
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(epochs=args.epochs, as_json=args.json)


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "decompose": cmd_decompose, "inspect": cmd_inspect,
            "compose": cmd_compose, "replace": cmd_replace, "import": cmd_import, "demo": cmd_demo,
            "export": cmd_export}
