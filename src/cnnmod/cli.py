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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--augment", default="auto", choices=["auto", "crop-flip", "crop", "none"])
    p.add_argument("--no-bn", action="store_true", help="the BatchNorm-free variant (ResNets)")
    p.add_argument("--resume", action="store_true", help="continue from the last saved epoch")

    p = sub.add_parser("evaluate", help="top-1, top-5 and per-class accuracy")
    p.add_argument("file")
    _data_args(p)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("demo", help="the whole pipeline on the embedded MNIST digits")
    p.add_argument("--json", action="store_true")
    p.add_argument("--epochs", type=int, default=3)
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
                         augment=args.augment)
    meta = train(args.model, data, args.out, config, val=val, resume=args.resume,
                 arch_args={"bn": False} if args.no_bn else None)
    acc = meta["accuracy"]
    print(f"wrote {args.out}: {acc['split']} top-1 {acc['top1']:.4f}, top-5 {acc['top5']:.4f} (n={acc['n']})")
    return 0


def cmd_evaluate(args) -> int:
    from .data import load_data
    from .evaluate import evaluate_model
    from .checkpoint import load_model

    model = load_model(args.file)
    data = load_data(args.data, args.split, default_split="test", channels=model.input_spec.channels,
                     size=model.input_spec.size)
    result = evaluate_model(model, data)
    _print_result(result, args.json)
    return 0


def _print_result(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, sort_keys=True))
        return
    print(f"top-1 {result['top1']:.4f}  top-5 {result['top5']:.4f}  n={result['n']}")
    width = max(len(c) for c in result["per_class"])
    for name, acc in result["per_class"].items():
        print(f"  {name:<{width}}  {acc:.4f}")


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(epochs=args.epochs, as_json=args.json)


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "demo": cmd_demo}
