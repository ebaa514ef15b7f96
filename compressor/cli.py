"""The ``compress`` command. It owns messages, exit codes and progress bars.

    compress --model vgg16 --recipe recipes/robust.yaml       run the whole pipeline
    compress export exported/RUN/model.safetensors            export/check/time a saved model
    compress list models|attacks|datasets [PATTERN]

Exit codes: 0 success, 2 bad input (one line on stderr, nothing written), 1 internal error,
130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path

from .errors import INPUTS_CHECKED, CompressorError

PROG = "compress"
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line and exit code 2 (no usage dump)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        raise SystemExit(EXIT_USAGE)


def _run_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description=(
            "Compress a vision classifier: factorize its layers (SVD / Tucker-2), fine-tune with RobustDLRT "
            "(rank-adaptive low-rank training + spectral regularizer), evaluate clean and adversarial accuracy "
            "dense vs compressed, export safetensors + ONNX into OUTPUT_DIR/RUN_NAME. "
            "Other commands: 'compress export PATH' and 'compress list models|attacks|datasets'."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "examples:\n"
            "  compress --model vgg16 --recipe recipes/robust.yaml\n"
            "  compress --model tv:resnet18 --recipe recipes/dlrt.yaml --set train.epochs=5 --run-name r18\n"
            "  compress --model vgg16 --data fashion-mnist --set data.train_subset=5000\n"
            "  torchrun --nproc_per_node 2 -m compressor.cli --model vgg16 --recipe recipes/robust.yaml\n"
            "Recipe keys are documented in docs/recipes.md."
        ),
    )
    p.add_argument(
        "--model",
        help="model name: vgg16, resnet18, vit_b_16, ... (bare names: torchvision first, "
        "then timm) or prefixed tv:NAME / timm:NAME; overrides model.name",
    )
    p.add_argument("--recipe", type=Path, help="recipe YAML (e.g. recipes/robust.yaml); default: built-in defaults")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any recipe key, e.g. --set train.beta=0.1 (repeatable; value read as YAML)",
    )
    p.add_argument(
        "--data",
        help="data set: digits (embedded default), fashion-mnist, mnist, cifar10, cifar100, "
        "imagefolder; overrides data.name",
    )
    p.add_argument("--data-root", help="folder of the data set; overrides data.root")
    p.add_argument(
        "--weights",
        help="local weight file (.safetensors, or .pth/.pt read with weights_only=True); overrides model.weights",
    )
    p.add_argument("--run-name", help="name of the run folder; overrides run_name")
    p.add_argument("--output-dir", help="where run folders go (default: exported); overrides output_dir")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N; overrides train.device")
    p.add_argument("--seed", type=int, help="random seed; overrides seed")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="factorize only: print every layer's initial ranks, parameters and multiply-adds dense vs factorized "
        "(no training, nothing written)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run of the same run name and recipe from its last checkpoint",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an existing run folder of the same name (or discard an interrupted one)",
    )
    p.add_argument("--quiet", action="store_true", help="no logs and no progress bars; only the summary and errors")
    p.add_argument("--debug", action="store_true", help="debug logs, and a traceback on internal errors")
    return p


def _export_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=f"{PROG} export",
        description=(
            "Export a compressed model saved as safetensors (model.safetensors of a run) to ONNX without retraining: "
            "structure and parity checks, onnxruntime latency, optional INT8. Writes model.onnx and export.json."
        ),
    )
    p.add_argument("path", type=Path, help="model.safetensors written by a compress run")
    p.add_argument("--out", type=Path, help="output folder (default: the file's folder)")
    p.add_argument("--opset", type=int, help="ONNX opset (default: the recipe's export.opset)")
    p.add_argument(
        "--int8",
        action="store_true",
        help="also write a static-QDQ INT8 model, calibrated on training images of the data the model was trained "
        "on (or --data) and checked against FP32 on its validation split",
    )
    p.add_argument(
        "--data",
        help="data set for validation and INT8 calibration (default: the one in the model's recipe); "
        "see 'compress list datasets'",
    )
    p.add_argument("--data-root", help="folder of that data set")
    p.add_argument(
        "--calibration",
        help="INT8 calibration images instead of training images: a .safetensors file with an 'images' tensor "
        "(N,C,H,W in [0,1]), or 'random' for uniform noise (costs accuracy; only when nothing else exists)",
    )
    p.add_argument("--no-latency", action="store_true", help="skip the onnxruntime latency measurement")
    p.add_argument("--quiet", action="store_true", help="no logs")
    p.add_argument("--debug", action="store_true", help="debug logs, and a traceback on internal errors")
    return p


def _list_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=f"{PROG} list", description="List the names compress accepts.")
    p.add_argument("what", choices=["models", "attacks", "datasets"])
    p.add_argument("pattern", nargs="?", default="*", help="glob pattern for models (e.g. 'vgg*')")
    return p


class _HoldLogs(logging.Handler):
    """Holds log records back until the library marks its inputs as checked (a record with the
    :data:`~compressor.errors.INPUTS_CHECKED` attribute), then hands them, and every later one,
    to ``target``. Bad input found before that point thus prints one line, the error, and not
    the log of the stages that ran before it; a good run shows the same log, a moment later."""

    def __init__(self, target: logging.Handler) -> None:
        super().__init__()
        self.target = target
        self.held: list[logging.LogRecord] = []
        self.released = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.released and getattr(record, INPUTS_CHECKED, False):
            self.pass_on()
        if self.released:
            self.target.handle(record)
        else:
            self.held.append(record)

    def pass_on(self) -> None:  # (not "release": logging.Handler.release() is its lock's)
        self.released = True
        held, self.held = self.held, []
        for record in held:
            self.target.handle(record)

    def drop(self) -> None:
        self.held = []


_holder: _HoldLogs | None = None


def _setup_logging(quiet: bool, debug: bool) -> None:
    global _holder
    level = logging.DEBUG if debug else (logging.ERROR if quiet else logging.INFO)
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    logging.captureWarnings(True)  # library warnings go through the log (and its holding back)
    for noisy in ("matplotlib", "PIL", "onnxscript", "onnx_ir", "torch.onnx", "torch._dynamo", "torch.export"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    _holder = None
    if not debug:  # --debug shows everything as it happens
        root = logging.getLogger()
        target = root.handlers[0]
        root.removeHandler(target)
        _holder = _HoldLogs(target)
        root.addHandler(_holder)


def _tqdm_factory(enabled: bool):
    from tqdm.auto import tqdm

    def factory(total: int, desc: str):
        return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, disable=not enabled, file=sys.stderr)

    return factory


def _cmd_run(argv: list[str]) -> int:
    args = _run_parser().parse_args(argv)
    _setup_logging(args.quiet, args.debug)
    from .recipe import load_recipe

    overrides: list[str] = []
    for flag, key in (
        ("model", "model.name"),
        ("data", "data.name"),
        ("data_root", "data.root"),
        ("weights", "model.weights"),
        ("run_name", "run_name"),
        ("output_dir", "output_dir"),
        ("device", "train.device"),
    ):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={_yaml_str(value)}")
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    overrides += args.overrides  # explicit --set wins over the shorthand flags
    recipe = load_recipe(args.recipe, overrides)

    if args.dry_run:
        from .preflight import validate_inputs
        from .stages import dry_run

        validate_inputs(recipe)
        print(dry_run(recipe).summary())
        return 0
    from .pipeline import run
    from .report import export_table, summary_table
    from .runtime import init_from_env, shutdown

    dist = init_from_env(device=recipe.train.device)  # under torchrun: gloo on CPUs, NCCL for CUDA
    try:
        result = run(
            recipe,
            resume=args.resume,
            force=args.force,
            progress=_tqdm_factory(not args.quiet and dist.is_main),
            dist=dist,
        )
    finally:
        shutdown()
    if dist.is_main:
        print(summary_table(result.report))
        export = result.report.get("export") or {}
        if export.get("parity") is not None:
            print("\n" + export_table(export))
        if warning := (export.get("int8") or {}).get("warning"):
            print(f"\nWARNING: {warning}")
        files = ", ".join(["report.md", "report.json", *(export.get("files") or {}).values(), "recipe.yaml"])
        print(f"\noutputs: {result.folder}/ ({files})")
    return 0


def _yaml_str(value: str) -> str:
    """Quote a CLI string so that YAML reads it back as that string."""
    import json

    return json.dumps(value)


def _cmd_export(argv: list[str]) -> int:
    args = _export_parser().parse_args(argv)
    _setup_logging(args.quiet, args.debug)
    if args.path.suffix.lower() == ".onnx":
        raise CompressorError(
            f"{args.path}: compress export reads the model.safetensors of a run (it writes the ONNX "
            f"file); give e.g. {args.path.with_suffix('.safetensors')}"
        )
    from .export import SUMMARY_NAME
    from .recipe import ExportSection
    from .reexport import export_saved
    from .sections import resolve_section

    options = {"int8": args.int8, "latency": not args.no_latency}
    if args.opset is not None:
        options["opset"] = args.opset
    # checked before the file is read: a bad value is refused with nothing done
    section = resolve_section(ExportSection, None, options, source=f"--opset {args.opset}")
    out = args.out or args.path.parent
    calibration, source = None, "given images"
    if args.calibration is not None and args.calibration != "random":
        from .models import read_state_dict

        tensors = read_state_dict(args.calibration)
        if "images" not in tensors:
            raise CompressorError(f"{args.calibration}: no 'images' tensor (save one with safetensors)")
        calibration, source = tensors["images"], str(args.calibration)
    data = {k: v for k, v in (("name", args.data), ("root", args.data_root)) if v is not None} or None
    result = export_saved(
        args.path,
        out,
        section,
        calibration=calibration,
        calibration_source=source,
        data=data,
        random_calibration=args.calibration == "random",
    )
    from .report import export_table

    print(export_table(result.to_dict()))
    if warning := (result.int8 or {}).get("warning"):
        print(f"\nWARNING: {warning}")
    print(f"\noutputs: {out}/ ({', '.join([*result.files.values(), SUMMARY_NAME])})")
    return 0


def _cmd_list(argv: list[str]) -> int:
    args = _list_parser().parse_args(argv)
    if args.what == "models":
        from .models import list_models

        names = list_models(args.pattern)
    elif args.what == "attacks":
        from .attacks import list_attacks

        names = list_attacks()
    else:
        from .data import list_datasets

        names = list_datasets()
    print("\n".join(names))
    return 0


def enable_huge_pages() -> None:
    """Let PyTorch's CPU allocator back large tensors with transparent huge pages.

    ``THP_MEM_ALLOC_ENABLE`` (PyTorch ≥ 2.2) makes the allocator ``madvise`` buffers of 2 MB
    and more. A training step of a model with a large dense layer allocates its gradients afresh
    each step, hundreds of MB that would otherwise fault in 4 KB page by page. PyTorch reads the
    variable once, at its first CPU allocation, so this runs before any tensor exists; an
    explicit ``THP_MEM_ALLOC_ENABLE=0`` wins. Set by the command only: the library leaves the
    process environment alone.
    """
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def main(argv: list[str] | None = None) -> int:
    enable_huge_pages()
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"export": _cmd_export, "list": _cmd_list}
    command = commands.get(argv[0], _cmd_run) if argv else _cmd_run
    if argv and argv[0] in commands:
        argv = argv[1:]
    debug = "--debug" in argv
    global _holder
    _holder = None
    try:
        return command(argv)
    except CompressorError as err:
        if _holder is not None:
            _holder.drop()  # the log of the stages before the refusal: only the error is shown
        sys.stderr.write(f"{PROG}: error: {' '.join(str(err).split())}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        _release_logs()
        sys.stderr.write(f"{PROG}: interrupted (an interrupted run continues with --resume)\n")
        return 130
    except SystemExit as exit_:
        return int(exit_.code or 0)
    except Exception as err:  # a bug, not bad input: say so in one line unless --debug
        _release_logs()
        if debug:
            traceback.print_exc()
        else:
            sys.stderr.write(
                f"{PROG}: internal error: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''} "
                f"(rerun with --debug for the traceback; please report it)\n"
            )
        return 1
    finally:
        _release_logs()


def _release_logs() -> None:
    if _holder is not None:
        _holder.pass_on()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
