"""The commands: each one a thin call into the library, and how its result is printed."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ..errors import CnnmodError
from ..options import flag, given

RULES = {"vote": "the paper's vote: argmax of the module margins",
         "calibrated": "calibrated scores: argmax of each module's calibrated log-odds"}


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
    from ..data import load_data
    from ..training import TrainConfig, train

    data = load_data(args.data, args.split, default_split="train", size=_size(args))
    val = load_data(args.data, args.val_split, size=_size(args)) if args.val_split else None
    config = TrainConfig(**given(TrainConfig, args))
    if args.resume:
        _nothing_to_resume([Path(args.out).with_name(Path(args.out).name + ".resume.safetensors")])
    meta = train(args.model, data, args.out, config, val=val, resume=args.resume,
                 arch_args={"bn": False} if args.no_bn else None, device=args.device)
    acc = meta["accuracy"]
    print(f"wrote {args.out}: {acc['split']} top-1 {acc['top1']:.4f}, top-5 {acc['top5']:.4f} (n={acc['n']})")
    return 0


def cmd_evaluate(args) -> int:
    from ..compose import compose, load_classifier
    from ..data import load_data_for
    from ..distributed import resolve_device
    from ..evaluate import evaluate_model, evaluate_module, evaluate_scores

    device = resolve_device(args.device)
    wanted = _names(args.classes)
    if wanted is not None and len(set(wanted)) != len(wanted):
        raise CnnmodError(f"expected --classes to name each class once, found {args.classes!r}.")
    kind, clf = load_classifier(args.file)
    if wanted is not None and len(wanted) < 2 and kind != "module":
        raise CnnmodError(f"expected two or more classes for --classes (a classifier of one class is always right), "
                          f"found {args.classes!r}.")
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
            others = _plural(c["fp"] + c["tn"], "image")
            print(f"module {result['class']!r} alone, its class against the other {others} "
                  f"(n={result['n']}, {result['positives']} of its class):")
            rows = [("margin > 0 (its vote in a composition)", result)]
            if "at_threshold" in result:
                t = result["at_threshold"]
                rows.append((f"margin > {t['threshold']:.4g} (its own threshold, the best F1 on its calibration "
                             "images)", t))
            for what, r in rows:
                print(f"  {what}: precision {r['precision']:.4f}  recall {r['recall']:.4f}  F1 {r['f1']:.4f}  "
                      f"accuracy {r['accuracy']:.4f}")
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
        from ..plot import plot_evaluation

        plot_evaluation(result, args.plot, title=f"{' '.join(args.file)}: {what}")
        print(f"wrote {args.plot}", file=sys.stderr if args.json else sys.stdout)  # --json: one object on stdout
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
    top5 = f"  top-5 {result['top5']:.4f}" if len(result.get("classes", result["per_class"])) > 5 else ""  # 5 or fewer: 1
    print(f"top-1 {result['top1']:.4f}{top5}  n={result['n']}"
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
        print(" " * (rw + 2) + "".join(f"  {p:>{w}}" for p, w in zip(c["predicted"], cols)))  # over its column
        for t, row in zip(c["true"], c["matrix"]):
            print(f"  {t:<{rw}}" + "".join(f"  {v:>{w}}" for v, w in zip(row, cols)))


def _strategy_options(args) -> dict:
    """The options of the chosen strategy given on the command line; an option of another strategy
    is an error, not ignored (the options are the fields of each strategy's dataclass)."""
    from ..modules.strategies import STRATEGIES

    chosen, options = STRATEGIES[args.strategy], {}
    for name, strategy in STRATEGIES.items():
        for field_name, value in given(strategy.options, args).items():
            if name != args.strategy:
                raise CnnmodError(f"expected {flag(strategy.options, field_name)} only with --strategy {name}, found "
                                  f"it with --strategy {args.strategy} ({chosen.description}).")
            options[field_name] = value
    if args.sample_images is not None and not chosen.needs_sums:  # an observation option (ObserveOptions)
        raise CnnmodError(f"expected --sample-images only with --strategy channels, found it with --strategy "
                          f"{args.strategy} ({chosen.description}).")
    return options


def _distill_options(args) -> dict | None:
    from ..modules.distill import DistillOptions

    options = given(DistillOptions, args)
    if "epochs" not in options:
        if options:
            raise CnnmodError(f"expected {flag(DistillOptions, next(iter(options)))} only with --distill EPOCHS, "
                              "found it alone.")
        return None
    return options  # its seed: the run's (decompose's)


def _nothing_to_resume(files: list[Path]) -> None:
    """``--resume`` with no saved state beside the output: say so (the run starts from the beginning)."""
    if not any(f.exists() for f in files):
        print(f"cnnmod: nothing saved to resume ({files[0].name} does not exist): starting from the beginning.",
              file=sys.stderr)


def cmd_decompose(args) -> int:
    from ..modules.observe import ObserveOptions
    from ..modules.pipeline import decompose_to_directory

    if args.resume:
        out = Path(args.out).resolve()
        _nothing_to_resume([out.with_name(out.name + suffix) for suffix in (".stats-progress.safetensors",
                                                                            ".distill-progress.safetensors")])

    summary = decompose_to_directory(args.checkpoint, args.data, args.out, split=args.split, strategy=args.strategy,
                                     progress=not args.json, only=_names(args.only), resume=args.resume,
                                     device=args.device, distill=_distill_options(args),
                                     **given(ObserveOptions, args), **_strategy_options(args))
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
    for step in ("statistics", "calibration"):
        share = summary[f"{step}_share_of_parent_training"]
        if summary[f"{step}_macs"]:
            print(f"  {step} pass: {summary[f'{step}_macs']:.3g} multiply-accumulates (forward only)"
                  + (f", {share:.2%} of what training the parent cost" if share is not None else ""))
    if "max_loss" in summary:
        chosen = summary["max_loss"]
        what = "every channel" if chosen["retain"] >= 1 else f"--retain {chosen['retain']}"
        where = (_plural(chosen["images"], "held-back image") if chosen["source"].startswith("held out") else
                 f"{_plural(chosen['images'], 'image')} the statistics pass saw")
        points = f"{chosen['points']:g} point{'' if chosen['points'] == 1 else 's'}"
        print(f"  --max-loss {chosen['points']:g}: chose {what}, the fewest channels that lose at most "
              f"{points} on {where} (points lost: "
              f"{', '.join(f'{r} {v:.1f}' for r, v in chosen['tried'].items())}; the chosen one's standard "
              f"error on these images: {chosen['standard_error']:.1f} points)")
    held = summary.get("held_back")
    if held and held["images"]:
        lost = 100 * (held["model_top1"] - held["composed_top1"])
        where = (_plural(held["images"], "held-back image") if held["source"].startswith("held out") else
                 f"{_plural(held['images'], 'image')} the statistics pass saw (none left to hold back)")
        print(f"  on {where}: the modules composed {100 * held['composed_top1']:.1f}% top-1, the model "
              f"{100 * held['model_top1']:.1f}%" + (" restricted to their classes" if args.only else "")
              + f": {'loses' if lost >= 0 else 'gains'} {abs(lost):.1f} points"
              + (" (a larger --keep or --retain loses less)" if lost > 5 and summary["strategy"] == "channels" else ""))
    if "distillation" in summary:
        d = summary["distillation"]
        share = (f", {d['share_of_parent_training']:.2%} of what training the parent cost"
                 if d["share_of_parent_training"] is not None else "")
        print(f"  distilled: {_plural(d['steps'], 'step')} over {_plural(d['images'], 'image')}, "
              f"{d['macs']:.3g} multiply-accumulates{share}; loss {d['loss_before']:.4g} -> {d['loss_after']:.4g}"
              + ("" if d["kept"] else ": not lower, so the modules are kept as built (try a smaller --distill-lr)"))
    for name, m in summary["modules"].items():
        smaller = (f": {m['params_fraction']:.3f} of the parameters, {m['macs_fraction']:.3f} of the MACs"
                   if "params_fraction" in m and m.get("channels_prunable") != 0 else "")
        print(f"  {name:<12} {m['kept']}{smaller}, {m['file_bytes']:,} bytes on disk")
    return 0


def cmd_export(args) -> int:
    from ..export import export_onnx

    if args.module is not None:
        from ..modules import load_module, save_module

        if len(args.file) != 1:
            raise CnnmodError(f"expected one module file for --module, found {len(args.file)} files.")
        module = load_module(args.file[0])
        save_module(module, args.module)
        print(f"wrote {args.module}: class {module.class_name!r}, self-contained, "
              f"{os.path.getsize(args.module):,} bytes")
        return 0
    info = export_onnx(args.file, args.onnx)
    print(f"wrote {args.onnx}: {info['kind']} ({_plural(len(info['classes']), 'class')}), "
          f"input uint8 {info['input']['channels']}x{info['input']['size'][0]}x{info['input']['size'][1]}")
    return 0


def cmd_inspect(args) -> int:
    from ..inspect import describe, describe_metrics

    given = [flag for flag, value in (("--data", args.data), ("--plot", args.plot), ("--split", args.split))
             if value is not None]
    if given and not args.metrics:
        raise CnnmodError(f"expected {given[0]} only with --metrics, found it alone.")
    if args.metrics:
        if not Path(args.file).is_dir():
            raise CnnmodError(f"{args.file}: expected a module folder for --metrics, found "
                              f"{'a file' if Path(args.file).exists() else 'nothing there'}.")
        text, meta = describe_metrics(args.file, args.data, args.split, args.per_class, args.plot)
    else:
        text, meta = describe(args.file)
    if args.json:
        _print_json(meta)
    else:
        print(text)
    return 0


def cmd_compose(args) -> int:

    import torch

    from ..compose import compose, load_modules, save_composed
    from ..data import load_data_for
    from ..modules import load_module

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
        from ..modules.adapt import adapt_

        data = load_data_for(args.adapt_data, args.adapt_split, inputs, default_split="train")
        for m in modules:
            foreign = torch.tensor([c != m.class_name for c in data.classes])[data.labels]
            adapt_(m, data.images_for(m.input_spec)[foreign])
    if args.fit_data:
        from ..compose.fit import fit_composed_

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
    from ..compose import load_modules, replace
    from ..modules import load_module
    from ..modules.pipeline import write_modules

    options = _repair_options(args)
    new = load_module(args.new)
    modules = replace(load_modules(args.directory), new)
    if options is not None:
        from ..compose.repair import RepairOptions, repair_
        from ..data import load_data_for

        data = load_data_for(args.data, args.split, [m.input_spec for m in modules], default_split="train")
        from ..distributed import resolve_device

        report = repair_(modules, new.class_name, data, RepairOptions(**options), progress=True,
                         device=resolve_device(args.device))
    write_modules(modules, args.out)
    print(f"wrote {args.out}: module {new.class_name!r} replaced by {args.new}")
    if options is not None:
        _print_repair(report)
    return 0


def _repair_options(args) -> dict | None:
    from ..compose.repair import RepairOptions

    options = given(RepairOptions, args)
    stray = [f for f, v in (("--data", args.data), ("--split", args.split)) if v is not None]
    stray += [flag(RepairOptions, name) for name in options if name != "method"]
    if "method" not in options:
        if stray:
            raise CnnmodError(f"expected {stray[0]} only with --repair METHOD, found it alone.")
        return None
    if args.data is None:
        raise CnnmodError("expected --data (labelled images of the composed classes) with --repair, found none.")
    if options["method"] != "train" and {"epochs", "lr"} & set(options):
        raise CnnmodError(f"expected --repair-epochs and --repair-lr only with --repair train, found --repair "
                          f"{options['method']}.")
    return options


def _print_repair(report: dict) -> None:
    if not report["confused"]:
        print(f"  repair: no class is confused with {report['new_class']!r} on the {report['images']:,} images "
              "(none reaches the share); nothing changed")
        return
    confused = ", ".join(f"{c} {s:.1%}" for c, s in report["confused"].items())
    print(f"  confused with {report['new_class']!r} (the larger share of either class's images answered as the "
          f"other): {confused}")
    held = (f"on {report['check_images']:,} held-out images: loss {report['check_loss_before']:.4g} -> "
            f"{report['check_loss_after']:.4g}, accuracy (classes alike) {report['check_accuracy_before']:.2%} -> "
            f"{report['check_accuracy_after']:.2%}")
    stages = [report["method"]] + (["calibrate"] if report["method"] in ("continuous", "train") else [])
    undone = [s for s in stages if s not in report["kept"]]
    if not report["kept"]:
        print(f"  repair ({report['method']}): nothing kept, no stage lowered the loss {held}; the modules stay as "
              "replaced")
    else:
        print(f"  repaired ({report['method']}) on {report['images']:,} images"
              + (f", {_plural(report['steps'], 'step')}" if report["steps"] else "")
              + f"; kept: {', '.join(report['kept'])}" + (f"; undone: {', '.join(undone)}" if undone else "")
              + f"; {held}")
    share = report.get("share_of_parent_training")
    print(f"  cost: {report['macs']:.3g} multiply-accumulates (every module run over the images)"
          + (f", {share:.2%} of what training the confused modules' parent cost" if share is not None else ""))


def cmd_import(args) -> int:
    from ..data import load_data
    from ..importing import import_library_model, import_state_dict

    if args.model:
        if args.data is None:
            raise CnnmodError("expected --data with --model (its classes and input normalisation), found none.")
        data = load_data(args.data, args.split, default_split="train", size=_size(args))
        meta = import_state_dict(args.state_dict, args.model, data, args.out,
                                 arch_args={"bn": False} if args.no_bn else None)
    else:
        from ..data import load_data_for

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
    from ..demo import run_demo

    return run_demo(epochs=args.epochs, as_json=args.json)


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "decompose": cmd_decompose, "inspect": cmd_inspect,
            "compose": cmd_compose, "replace": cmd_replace, "import": cmd_import, "demo": cmd_demo,
            "export": cmd_export}
