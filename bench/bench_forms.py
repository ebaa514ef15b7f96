"""Per layer: does onnxruntime deliver a factorized conv's MAC saving, and in which export form?

Every Tucker-2 conv of a compressed run (model, input size and final ranks from its ``report.json``;
SVD-initialized at those ranks: the values do not matter for speed) is exported in each form by the
exporter's own code and timed beside the dense conv on the layer's input shape, interleaved.

    python bench/bench_forms.py --smoke       # seconds: 2 convs of timm test_resnet at half ranks (CI)
    python bench/bench_forms.py --report runs/macs02-m8/robust-vgg16-digits/report.json
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from harness import lib
from harness.report import table
from harness.run import Run, add_run_options, check_run_options, parser

log = logging.getLogger("bench_forms")
# 1×1 → k×k core → 1×1; 1×1 → k×k; k×k → 1×1; the Tucker form at one rank fewer per mode (off the
# multiple of 8 the ranks were rounded to)
FORMS = ("tucker3", "fold_out", "fold_in", "tucker3-1")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = parser(__doc__)
    ap.add_argument("--report", default=None, help="a run's report.json: model, input size and final ranks")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="onnxruntime intra-op threads")
    ap.add_argument("--repeats", type=int, default=20)
    add_run_options(ap, "forms", smoke="seconds: 2 convs of timm:test_resnet at half ranks (CI)", threads=None)
    args = ap.parse_args(argv)
    if not args.smoke and not args.report:
        ap.error("give --report <run>/report.json (or --smoke)")
    if args.report and not Path(args.report).is_file():
        ap.error(f"--report {args.report}: no such file (run compress first; see --help)")
    if args.repeats < 1 or any(t < 1 for t in args.threads):
        ap.error("--repeats and --threads must be at least 1")
    if args.smoke:
        args.repeats, args.threads = 3, [1]
    check_run_options(ap, args, "forms")
    return args


def compressed_layers(args: argparse.Namespace) -> tuple[str, int, dict[str, lib.TuckerConv2d], dict[str, tuple]]:
    """The run's model at its final ranks: (model name, input size, Tucker layers, their input shapes)."""
    if args.smoke:
        name, size, ranks = "timm:test_resnet", 32, None
    else:
        report = json.loads(Path(args.report).read_text())
        name, size = report["model"]["name"], report["model"]["input_size"]
        ranks = {n: tuple(v["ranks"]) for n, v in report["compressed"]["layers"].items()}
    model, _ = lib.create_model(name, 10, input_size=size)
    lib.factorize_(model, init="svd", init_rank=None, r_min=1, r_max=10**6, seed=0)
    layers = {n: m for n, m in lib.low_rank_layers(model).items() if isinstance(m, lib.TuckerConv2d)}
    if args.smoke:  # every layer goes through the same five exports: two show that they work
        layers = dict(list(layers.items())[:2])
    for n, layer in layers.items():
        want = ranks[n] if ranks else tuple(max(1, r // 2) for r in layer.ranks)
        layer.truncate_(0.0, rank_cap=want)
    shapes: dict[str, tuple] = {}

    def record(name: str):
        def hook(module, inputs, output) -> None:  # a hook that returned a value would replace the output
            shapes.setdefault(name, tuple(inputs[0].shape))

        return hook

    hooks = [m.register_forward_hook(record(n)) for n, m in layers.items()]
    with torch.no_grad():
        model.eval()(torch.rand(1, 3, size, size))
    for h in hooks:
        h.remove()
    return name, size, layers, shapes


def one_fewer(layer: lib.TuckerConv2d) -> lib.TuckerConv2d:
    smaller = copy.deepcopy(layer)
    smaller.truncate_(0.0, rank_cap=tuple(max(1, r - 1) for r in layer.ranks))
    return smaller


def macs(layer: lib.TuckerConv2d, form: str, out_px: int, in_px: int) -> int:
    if form == "tucker3-1":
        return macs(one_fewer(layer), "tucker3", out_px, in_px)
    c_in, c_out, k = layer.in_channels, layer.out_channels, layer.kernel_size[0] * layer.kernel_size[1]
    r_out, r_in = layer.ranks
    return {
        "dense": c_out * c_in * k * out_px,
        "tucker3": c_in * r_in * in_px + r_in * r_out * k * out_px + r_out * c_out * out_px,
        "fold_out": c_in * r_in * in_px + r_in * c_out * k * out_px,
        "fold_in": c_in * r_out * k * out_px + r_out * c_out * out_px,
    }[form]


def measure(args: argparse.Namespace) -> dict[str, Any]:
    name, size, layers, shapes = compressed_layers(args)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-forms-") as tmp:
        for n, layer in layers.items():
            _, c_in, h, w = shapes[n]
            if h != w:
                continue
            with torch.no_grad():
                out = layer(torch.zeros(1, c_in, h, w))
            out_px, in_px = out.shape[-2] * out.shape[-1], h * w
            paths = {}
            for form in ("dense", *FORMS):
                paths[form] = Path(tmp) / f"{form}.onnx"
                plain = lib.plain_layer(*((one_fewer(layer), "tucker3") if form == "tucker3-1" else (layer, form)))
                lib.export_onnx(plain, paths[form], input_size=h, in_chans=c_in, check=False)
            row: dict[str, Any] = {"layer": n, "shape": [c_in, layer.out_channels, h], "ranks": list(layer.ranks)}
            row["mac_ratio"] = {f: macs(layer, "dense", out_px, in_px) / macs(layer, f, out_px, in_px) for f in FORMS}
            for t in args.threads:
                lat = lib.onnx_latencies(paths, input_size=h, in_chans=c_in, threads=t, repeats=args.repeats, warmup=2)
                row[f"speedup_t{t}"] = {
                    f"b{b}": {f: lat["dense"][b]["median_ms"] / lat[f][b]["median_ms"] for f in FORMS} for b in (1, 32)
                }
            rows.append(row)
            log.info("%s %s ranks %s: %s", n, row["shape"], row["ranks"], row[f"speedup_t{args.threads[0]}"])
    return {"model": name, "input_size": size, "layers": rows}


def render(args: argparse.Namespace, doc: dict[str, Any]) -> str:
    t = args.threads
    head = ["layer", "c_in→c_out @ px", "ranks"] + [f"{f} b{b} t{x}" for x in t for b in (1, 32) for f in FORMS]
    cells = []
    for r in doc["layers"]:
        row = [r["layer"].removeprefix("net."), f"{r['shape'][0]}→{r['shape'][1]} @ {r['shape'][2]}", str(r["ranks"])]
        for x in t:
            for b in ("b1", "b32"):
                row += [f"{r[f'speedup_t{x}'][b][f]:.2f} ({r['mac_ratio'][f]:.2f})" for f in FORMS]
        cells.append(row)
    out = [
        f"## Export forms per layer: {doc['model']} at {doc['input_size']} px",
        "",
        "Speedup of each form over the dense conv in onnxruntime (interleaved, median of "
        f"{args.repeats}), batch b, t intra-op threads; in brackets the form's MAC ratio. "
        + (f"Ranks from `{args.report}`." if args.report else "Half ranks (smoke)."),
        "",
        *table(head, "l" * len(head), cells),
    ]
    b32 = lambda r: r[f"speedup_t{t[0]}"]["b32"]
    best = [r["layer"].removeprefix("net.") for r in doc["layers"] if max(FORMS[:3], key=b32(r).get) != "tucker3"]
    slower = [r for r in doc["layers"] if b32(r)["tucker3-1"] < b32(r)["tucker3"]]
    n = len(doc["layers"])
    where = f"{len(best)} of {n} layers ({', '.join(best)})." if best else f"none of the {n} layers."
    out += [
        "",
        f"At batch 32 and {t[0]} thread(s), a folded form beats the Tucker form at {where} One rank fewer per mode "
        f"(tucker3-1: fewer MACs, off the multiple of 8) is slower than the ranks as they are at {len(slower)} of {n} "
        "layers.",
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = Run(__file__, args, argv, torch_threads=1)
    doc = measure(args)
    doc["run"] = {k: v for k, v in run.record().items() if k != "torch_threads"}
    doc["markdown"] = md = render(args, doc)
    run.publish(
        "forms",
        doc,
        md,
        measured="onnxruntime speedup of each export form of every factorized conv over its dense conv, beside "
        "the form's MAC ratio, per batch size and thread count.",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
