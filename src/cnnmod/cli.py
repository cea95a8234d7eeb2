"""The command line: a thin shell over the library, ``main(argv) -> exit code``."""

from __future__ import annotations

import argparse
import json
import sys

from .errors import CnnmodError


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="mnist5k, digits, an image folder, a .tar(.gz) or a CIFAR folder")
    p.add_argument("--split", choices=["train", "test", "val", "all"], default=None,
                   help="which part of the data (named sets: train/test; folders: all, or train/val)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cnnmod", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a registered model and write a checkpoint")
    p.add_argument("--model", required=True)
    _data_args(p)
    p.add_argument("--val-split", default=None, help="also report accuracy on this split each epoch")
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=0, help="epochs of linear learning-rate warm-up")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--augment", default="auto", choices=["auto", "crop-flip", "crop", "none"])
    p.add_argument("--no-bn", action="store_true", help="the BatchNorm-free variant (ResNets)")
    p.add_argument("--resume", action="store_true", help="continue from the last saved epoch")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")

    p = sub.add_parser("evaluate", help="top-1, top-5 and per-class accuracy")
    p.add_argument("file", nargs="+", help="a checkpoint, a composed file, a module directory or module files")
    _data_args(p)
    p.add_argument("--classes", default=None, help="comma-separated data classes to evaluate on (default: all)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("decompose", help="write one module file per class")
    p.add_argument("checkpoint")
    _data_args(p)
    p.add_argument("--out", required=True, help="directory for <class>.safetensors files")
    p.add_argument("--strategy", default="paper",
                   help="paper: Pan & Rajan's masks; channels: whole channels, physically smaller modules")
    p.add_argument("--keep", type=float, default=0.5,
                   help="channels strategy: share of each channel space a module keeps")
    p.add_argument("--trunk", type=float, default=0.0,
                   help="channels strategy: share of the parent's MACs, from the input, pruned alike for every "
                        "class, so that composed modules run it once")
    p.add_argument("--trunk-keep", type=float, default=None,
                   help="channels strategy: share of each trunk channel space kept (default: --keep)")
    p.add_argument("--keep-streams", action="store_true",
                   help="channels strategy: keep residual streams whole, prune only inside blocks")
    p.add_argument("--score", default="rate", choices=["rate", "energy"],
                   help="channels strategy: rank channels by firing rate per class or by the error removing them causes")
    p.add_argument("--retain", type=float, default=None,
                   help="channels strategy: instead of --keep, keep per space the best channels holding this share "
                        "of the space's total score")
    p.add_argument("--multiple", type=int, default=1,
                   help="channels strategy: round each space's kept channels to a multiple of this (8: the block "
                        "size of CPU convolution kernels, so that every removed channel saves time)")
    p.add_argument("--sample-images", type=int, default=256,
                   help="channels strategy: images of the observed sample that channels are scored and layers "
                        "re-fitted on (more: closer re-fits, slower)")
    p.add_argument("--only", default=None,
                   help="comma-separated classes: build only their modules (channels strategy: scored, trunk "
                        "chosen and re-fitted on their images alone, for a reuse of these classes)")
    p.add_argument("--positives", type=int, default=1000, help="images per class observed (paper: 1000)")
    p.add_argument("--negatives-per-class", type=int, default=None,
                   help="negatives of each other class (default: positives // (classes - 1), 1:1)")
    p.add_argument("--delta", type=float, default=0.5, help="MC-BLN threshold (paper: 0.5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run's statistics")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (torchrun: one process per device)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="bf16: autocast statistics pass (faster on GPUs; may change masks, see BENCHMARKS.md)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("export", help="write a module, composed classifier or checkpoint as ONNX")
    p.add_argument("file", nargs="+", help="a module file, a composed file, a module directory or a checkpoint")
    p.add_argument("--onnx", required=True, help="the ONNX file to write")

    p = sub.add_parser("inspect", help="show what a checkpoint, module or composed file holds")
    p.add_argument("file")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("compose", help="compose module files into one classifier file")
    p.add_argument("files", nargs="+", help="module files or module directories")
    p.add_argument("--out", required=True)
    p.add_argument("--rule", choices=["auto", "vote", "calibrated"], default="auto",
                   help="vote: the paper's rule; calibrated: calibrated scores (auto: calibrated when possible)")
    p.add_argument("--unknown-below", type=float, default=None,
                   help="answer 'unknown' when no module's calibrated probability reaches this")
    p.add_argument("--adapt-data", default=None,
                   help="continuous learning: re-run TI of each module with this data's other classes")
    p.add_argument("--adapt-split", default=None)
    p.add_argument("--fit-data", default=None,
                   help="fit the modules' calibrations jointly on this data's images of the composed classes "
                        "(2 scalars per module, no network training); implies the calibrated rule")
    p.add_argument("--fit-split", default=None)
    p.add_argument("--fit-per-class", type=int, default=100, help="images per class for --fit-data")

    p = sub.add_parser("replace", help="swap the module of one class in a module directory")
    p.add_argument("directory")
    p.add_argument("--with", dest="new", required=True, help="the new module file")
    p.add_argument("--out", required=True, help="the new module directory")

    p = sub.add_parser("import", help="turn a .pt/.pth state dict into a checkpoint (weights_only loading)")
    p.add_argument("state_dict")
    p.add_argument("--model", required=True, help="the registered architecture the weights belong to")
    _data_args(p)
    p.add_argument("--no-bn", action="store_true")
    p.add_argument("--out", required=True)

    p = sub.add_parser("demo", help="the whole pipeline on the embedded MNIST digits")
    p.add_argument("--json", action="store_true")
    p.add_argument("--epochs", type=int, default=4)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line on ``argv``; return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed its one-line usage error
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


def cmd_train(args) -> int:
    from .data import load_data
    from .training import TrainConfig, train

    data = load_data(args.data, args.split, default_split="train")
    val = load_data(args.data, args.val_split) if args.val_split else None
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                         warmup=args.warmup, augment=args.augment)
    meta = train(args.model, data, args.out, config, val=val, resume=args.resume,
                 arch_args={"bn": False} if args.no_bn else None, device=args.device)
    acc = meta["accuracy"]
    print(f"wrote {args.out}: {acc['split']} top-1 {acc['top1']:.4f}, top-5 {acc['top5']:.4f} (n={acc['n']})")
    return 0


def cmd_evaluate(args) -> int:
    from .compose import load_classifier
    from .data import load_data
    from .evaluate import evaluate_model, evaluate_scores

    from .distributed import resolve_device

    device = resolve_device(args.device)
    kind, clf = load_classifier(args.file)
    specs = {clf.input_spec} if kind == "model" else {m.input_spec for m in clf.modules_}
    only = specs.pop() if len(specs) == 1 else None  # decode straight to the one input size
    data = load_data(args.data, args.split, default_split="test",
                     channels=only.channels if only else None, size=only.size if only else None)
    if args.classes:
        data = data.only(args.classes.split(","))
    clf.to(device)
    if kind == "model":
        result = evaluate_model(clf, data, device=device)
    else:
        result = evaluate_scores(lambda x: clf.score_images(x.to(device)).cpu(), data, clf.classes,
                                 reject_below=clf.reject_below())
    _print_result(result, args.json)
    return 0


def cmd_decompose(args) -> int:
    from .modules.pipeline import decompose_to_directory

    summary = decompose_to_directory(args.checkpoint, args.data, args.out, split=args.split,
                                     strategy=args.strategy, positives=args.positives,
                                     negatives_per_class=args.negatives_per_class, seed=args.seed,
                                     batch_size=args.batch_size, progress=not args.json,
                                     **({"delta": args.delta} if args.strategy == "paper" else
                                        {"keep": args.keep, "trunk": args.trunk, "trunk_keep": args.trunk_keep,
                                         "streams": not args.keep_streams, "score": args.score,
                                         "retain": args.retain, "multiple": args.multiple,
                                         "sample_images": args.sample_images}),
                                     only=None if args.only is None else [c.strip() for c in args.only.split(",")],
                                     resume=args.resume, device=args.device, precision=args.precision)
    if summary["rank"] != 0:
        return 0  # rank 0 reports for the group
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    else:
        print(f"wrote {len(summary['modules'])} modules to {args.out} in {summary['seconds']:.1f} s "
              f"({summary['images']} images observed)")
        for name, m in summary["modules"].items():
            if "params_fraction" in m:  # the channels strategy
                print(f"  {name:<12} keeps {m['share_kept']:.4f} of the prunable channels: "
                      f"{m['params_fraction']:.3f} of the parameters, {m['flops_fraction']:.3f} of the MACs")
            else:
                print(f"  {name:<12} keeps {m['share_kept']:.4f} of the observed elements")
    return 0


def cmd_export(args) -> int:
    from .export import export_onnx

    info = export_onnx(args.file, args.onnx)
    print(f"wrote {args.onnx}: {info['kind']} ({len(info['classes'])} class(es)), input uint8 "
          f"{info['input']['channels']}x{info['input']['size'][0]}x{info['input']['size'][1]}")
    return 0


def cmd_inspect(args) -> int:
    from .inspect import describe

    text, meta = describe(args.file)
    print(json.dumps(meta, sort_keys=True) if args.json else text)
    return 0


def cmd_compose(args) -> int:
    from pathlib import Path

    import torch

    from .compose import compose, load_modules, save_composed
    from .modules import load_module

    modules = []
    for f in args.files:
        modules.extend(load_modules(f) if Path(f).is_dir() else [load_module(f)])
    if args.adapt_data:
        from .data import load_data
        from .modules.adapt import adapt_

        data = load_data(args.adapt_data, args.adapt_split, default_split="train")
        for m in modules:
            foreign = torch.tensor([c != m.class_name for c in data.classes])[data.labels]
            adapt_(m, data.images[foreign])
    if args.fit_data:
        from .compose.fit import fit_composed_
        from .data import load_data

        if args.fit_per_class < 1:
            raise CnnmodError(f"expected --fit-per-class >= 1, found {args.fit_per_class}.")
        if args.rule == "vote":
            raise CnnmodError("expected the calibrated rule with --fit-data (it fits calibrations), found --rule vote.")
        used = fit_composed_(modules, load_data(args.fit_data, args.fit_split, default_split="train"),
                             per_class=args.fit_per_class)
        print(f"fitted the {len(modules)} modules' calibrations jointly on {used} images of {args.fit_data}")
    rule = "calibrated" if args.fit_data else args.rule
    clf = compose(modules, rule=rule, unknown_below=args.unknown_below)
    save_composed(clf, args.out)
    print(f"wrote {args.out}: {len(clf.classes)} classes ({', '.join(clf.classes)}), rule {clf.rule}")
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


def _print_result(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, sort_keys=True))
        return
    print(f"top-1 {result['top1']:.4f}  top-5 {result['top5']:.4f}  n={result['n']}")
    width = max(len(c) for c in result["per_class"])
    for name, acc in result["per_class"].items():
        print(f"  {name:<{width}}  {acc:.4f}")


def cmd_import(args) -> int:
    from .data import load_data
    from .importing import import_state_dict

    data = load_data(args.data, args.split, default_split="train")
    meta = import_state_dict(args.state_dict, args.model, data, args.out,
                             arch_args={"bn": False} if args.no_bn else None)
    print(f"wrote {args.out}: top-1 {meta['accuracy']['top1']:.4f} on the given data (n={meta['accuracy']['n']})")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(epochs=args.epochs, as_json=args.json)


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "decompose": cmd_decompose, "inspect": cmd_inspect,
            "compose": cmd_compose, "replace": cmd_replace, "import": cmd_import, "demo": cmd_demo,
            "export": cmd_export}
