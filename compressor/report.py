"""The run report: report.json (everything, machine-readable), report.md (for people) and plots.

Plots are drawn on matplotlib's Agg canvas (no pyplot state) and written atomically.
"""

from __future__ import annotations

import math
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import atomic
from .errors import OutputError
from .runtime import dumps


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("compressor", "torch", "torchvision", "timm", "onnx", "onnxruntime", "safetensors"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def device_info(device: Any) -> dict[str, Any]:
    import os

    import torch

    info: dict[str, Any] = {
        "device": str(device),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        # the process's high-water mark of tensors on the run's device (training, attacks, evaluation)
        info["peak_memory_bytes"] = torch.cuda.max_memory_allocated(torch.device(device))
    return info


# ----------------------------------------------------------------------------- tables


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.2f}"


def format_eps(eps: str | float) -> str:
    """ε as people read it: 0.0314 rather than 0.03137254901960784, and 8/255 named."""
    e = float(eps)
    for k in range(1, 33):
        if abs(e - k / 255) < 1e-6:
            return f"{k}/255"
    return f"{e:.4g}"


def _eps_keys(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    keys: list[tuple[str, str]] = []
    for side in ("dense", "compressed"):
        for attack, per_eps in (report.get(side, {}).get("adversarial_accuracy") or {}).items():
            for eps in per_eps:
                if (attack, eps) not in keys:
                    keys.append((attack, eps))
    return keys


def summary_table(report: Mapping[str, Any]) -> str:
    """Dense vs compressed, side by side, as a Markdown table; each accuracy row says on how
    many validation images it is measured."""
    dense, comp = report.get("dense", {}), report.get("compressed", {})
    n_clean, n_att = comp.get("n_clean", dense.get("n_clean")), comp.get("n_attacked", dense.get("n_attacked"))
    rows = [
        ("", "images", "dense", "compressed"),
        ("parameters", "", f"{dense.get('params', 0):,}", f"{comp.get('params', 0):,}"),
        ("compression rate (%)", "", "0.00", f"{comp.get('compression_rate', 0.0):.2f}"),
        (
            "clean accuracy (%)",
            str(n_clean or "—"),
            _pct(dense.get("clean_accuracy")),
            _pct(comp.get("clean_accuracy")),
        ),
    ]
    keys = _eps_keys(report)
    if keys:
        rows.append(
            (
                "clean accuracy on the attacked images (%)",
                str(n_att or "—"),
                _pct(dense.get("clean_accuracy_attacked")),
                _pct(comp.get("clean_accuracy_attacked")),
            )
        )
    unit = report.get("eps_unit", "pixel")
    for attack, eps in keys:
        d = (dense.get("adversarial_accuracy") or {}).get(attack, {}).get(eps)
        c = (comp.get("adversarial_accuracy") or {}).get(attack, {}).get(eps)
        rows.append((f"{attack} ε={format_eps(eps)} ({unit}) (%)", str(n_att or "—"), _pct(d), _pct(c)))
    if dense.get("nonfinite_steps") or comp.get("nonfinite_steps"):  # shown only when it happened
        rows.append(
            (
                "training steps skipped (NaN/Inf)",
                "",
                str(dense.get("nonfinite_steps", 0)),
                str(comp.get("nonfinite_steps", 0)),
            )
        )
    out = [f"| {' | '.join(rows[0])} |", "|---|---:|---:|---:|"]
    out += [f"| {' | '.join(r)} |" for r in rows[1:]]
    return "\n".join(out)


def layers_table(report: Mapping[str, Any]) -> str:
    layers = report.get("compressed", {}).get("layers", {})
    if not layers:
        return "_no factorized layers_"
    out = ["| layer | ranks | κ | R(S) |", "|---|---|---:|---:|"]
    for name, d in layers.items():
        kappa = d.get("condition_number")
        out.append(
            f"| {name} | {','.join(map(str, d.get('ranks', [d.get('rank')])))} | "
            f"{'inf' if kappa is None else f'{kappa:.3g}'} | {d.get('regularizer', float('nan')):.3g} |"
        )
    return "\n".join(out)


def _mb(n: int | None) -> str:
    return "—" if n is None else f"{n / 1e6:.2f} MB"


def _int8_rows(q: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The INT8 check's choices: each calibration method's accuracy, the layers kept in float."""
    rows = []
    methods = q.get("calibration_methods") or {}
    if len(methods) > 1:
        each = ", ".join(f"{m} {_pct(a)} %" for m, a in methods.items())
        rows.append(("INT8 calibration, chosen by validation accuracy", f"{q.get('calibrate_method')} ({each})"))
    elif methods:
        rows.append(("INT8 calibration", f"{q.get('calibrate_method')} (within tolerance: no other method tried)"))
    if "clean_accuracy" in q:
        floats = list(q.get("float_layers") or []) + (["first and last"] if q.get("float_ends") else [])
        rows.append(("INT8 layers kept in float", ", ".join(floats) if floats else "none"))
    return rows


def export_table(export: Mapping[str, Any]) -> str:
    """The figures a deployer looks for: sizes, checks, multiply-adds, latency, INT8."""
    rows = [("", "value")]
    for kind, size in (export.get("sizes") or {}).items():
        rows.append((f"{(export.get('files') or {}).get(kind, kind)} size", _mb(size)))
    if (parity := export.get("parity")) is not None:
        rows.append(
            (
                "ONNX parity (max |Δlogit| / max |logit|)",
                f"{parity['rel_diff']:.2g} ({'pass' if parity['passed'] else 'FAIL'})",
            )
        )
    if (structure := export.get("structure")) is not None:
        rows.append(("ONNX graph keeps the factorization", "yes" if structure.get("matches") else "NO"))
    if (macs := export.get("macs")) is not None:
        rows.append(
            (
                "multiply-adds per image, dense → compressed",
                f"{macs['dense'] / 1e6:.1f} M → {macs['compressed'] / 1e6:.1f} M ({macs['ratio']:.2f}× fewer)"
                if macs.get("ratio")
                else "—",
            )
        )
    if (ev := export.get("onnx_eval")) is not None:
        rows.append((f"ONNX clean accuracy ({ev.get('n_clean')} images)", f"{_pct(ev.get('clean_accuracy'))} %"))
    if (q := export.get("int8")) is not None:
        acc = (q.get("eval") or {}).get("clean_accuracy", q.get("clean_accuracy"))
        n = (q.get("eval") or {}).get("n_clean", q.get("n_clean"))
        where = f"{n} images; " if n else ""
        rows.append((f"INT8 clean accuracy ({where}calibrated on {q.get('calibration')}; {q.get('variant')})",
                     "not measured" if acc is None else f"{_pct(acc)} %"))  # fmt: skip
        rows += _int8_rows(q)
    lat = export.get("latency") or {}
    threads = lat.get("threads")
    for name in ("dense", "compressed", "int8"):
        for b, v in (lat.get(name) or {}).items():
            rows.append((f"onnxruntime {name}, batch {b} ({threads} threads), median", f"{v['median_ms']:.2f} ms"))
    for other, per_batch in (lat.get("speedup") or {}).items():
        label = "speedup of the compressed model over dense" if other == "dense" else "speedup of INT8 over FP32"
        for b, s in per_batch.items():
            rows.append((f"{label}, batch {b}", f"{s:.2f}×"))
    out = ["| | value |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in rows[1:]]
    return "\n".join(out)


def certificate_line(cert: Mapping[str, Any]) -> str:
    """log ∏κ (the paper's eq. (2) bound on relative sensitivity) dense vs compressed, beside the
    relative sensitivity measured under the first attack."""

    def fmt(v: float | None) -> str:
        return "inf" if v is None else f"{v:.1f}"

    line = (
        f"Certificate (the paper's eq. 2): log ∏κ over {cert['layers']} factorized layers: dense "
        f"{fmt(cert['dense_log_prod_kappa'])}, compressed {fmt(cert['compressed_log_prod_kappa'])}"
    )
    if cert.get("layers_left_out"):
        line += f" ({cert['layers_left_out']} more layers too large for a dense spectrum are left out)"
    sens = cert.get("sensitivity") or {}
    dense, comp = sens.get("dense") or {}, sens.get("compressed") or {}
    for attack, per_eps in dense.items():
        for eps, d in per_eps.items():
            c = (comp.get(attack) or {}).get(eps)
            if d is not None and c is not None:
                measured = f"({attack}, ε={format_eps(eps)}): dense {d:.3g}, compressed {c:.3g}"
                return line + f". Measured relative sensitivity {measured}."
    return line + "."


def budget_table(budget: Mapping[str, Any]) -> str:
    """The budget asked for and reached, then where the multiply-adds went, layer by layer."""
    t, got = budget["target"], budget["reached"]
    lines = [
        f"Asked: {t['kind']} ≤ {t['fraction']:.3g} of the dense model's. Reached: parameters "
        f"{got['params_fraction']:.4f} (c.r. {got['compression_rate']:.2f} %), "
        f"multiply-adds {got['macs_fraction']:.4f} "
        f"({got['macs_dense'] / 1e6:.1f} M → {got['macs'] / 1e6:.1f} M per image).",
        "",
        "| layer | ranks | MACs dense → compressed (M) |",
        "|---|---|---:|",
    ]
    for name, d in budget["layers"].items():
        lines.append(
            f"| {name} | {','.join(map(str, d['ranks']))} | {d['macs_dense'] / 1e6:.2f} → {d['macs'] / 1e6:.2f} |"
        )
    if latency := budget.get("latency"):  # asked, predicted, measured (compressor.latency.markdown)
        from .latency.markdown import latency_section

        lines += ["", latency_section(latency)]
    return "\n".join(lines)


def loss_line(terms: list[Mapping[str, Any]]) -> str:
    """The objective's terms and their weights (report["loss_terms"]) as one sentence."""
    shown = []
    for term in terms:
        settings = ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
            for k, v in term.items()
            if k != "term" and v is not None
        )
        shown.append(f"{term['term']} ({settings})" if settings else str(term["term"]))
    return "Training loss terms: " + "; ".join(shown) + "."


def render_markdown(report: Mapping[str, Any]) -> str:
    r = report
    train = r.get("recipe", {}).get("train", {})
    data = r.get("data", {})
    comp = r.get("compressed", {})
    parts = [
        f"# compressor run `{r.get('run_name', '')}`",
        "",
        f"Model `{r.get('model', {}).get('spec', '')}` on `{data.get('name', '')}` "
        f"({data.get('n_train', '?')} training / {data.get('n_val', '?')} validation images), "
        f"β = {train.get('beta')}, τ = {train.get('tau')}. Device: {r.get('device', {}).get('device')}.",
        "",
    ]
    if terms := r.get("loss_terms"):
        parts += [loss_line(terms), ""]
    parts += ["## Dense vs compressed", "", summary_table(r), ""]
    if _eps_keys(r):
        parts += [
            f"Clean accuracy is measured on all {comp.get('n_clean', '?')} validation images; attacks on the "
            f"first {comp.get('n_attacked', '?')} of them, with the same attack seeds for both models, so compare "
            f"adversarial accuracy with the clean accuracy on the attacked images. "
            f"ε in {r.get('eps_unit', 'pixel')} units.",
            "",
        ]
    if cert := r.get("certificate"):
        parts += [certificate_line(cert), ""]
    if budget := r.get("budget"):
        parts += ["## Budget", "", budget_table(budget), ""]
    exp = r.get("export") or {}
    if exp:
        parts += ["## Export", "", export_table(exp), ""]
    parts += [
        "## Factorized layers (final ranks, condition numbers)",
        "",
        layers_table(r),
        "",
        "## Time per stage (s)",
        "",
        "| stage | seconds |",
        "|---|---:|",
    ]
    parts += [f"| {k} | {v:.1f} |" for k, v in (r.get("timings") or {}).items()]
    plots = r.get("plots") or {}
    if plots:
        parts += ["", "## Plots", ""] + [f"![{k}]({v})" for k, v in plots.items()]
    parts += [
        "",
        "Every figure, with the raw details (per-attack timings, the export plan, the training "
        "history), is in report.json.",
    ]
    return "\n".join(parts) + "\n"


def write_report(folder: Path, report: Mapping[str, Any]) -> None:
    atomic.write_text(folder / "report.json", dumps(report))
    atomic.write_text(folder / "report.md", render_markdown(report))


# ----------------------------------------------------------------------------- plots


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    try:
        with atomic.atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120)
    except OSError as err:
        raise OutputError(f"cannot write the plot {path}: {err}") from None
    return path


def _line_styles(n: int) -> list[tuple[Any, str]]:
    """``n`` distinguishable (colour, line style) pairs: ten colours, then the next line style."""
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    styles = ["-", "--", ":", "-."]
    return [(cmap(i % 10), styles[(i // 10) % len(styles)]) for i in range(n)]


def plot_kappa(kappa_trace: list[dict[str, Any]], path: Path, title: str = "") -> Path | None:
    """κ(S) of every factorized layer over training (the paper's Fig. 2), one line per layer,
    legend outside the axes."""
    if not kappa_trace:
        return None
    from matplotlib.ticker import MaxNLocator

    names = list(kappa_trace[-1]["kappa"])
    fig = _figure(9, 4.5)
    ax = fig.add_subplot()
    for name, (color, style) in zip(names, _line_styles(len(names))):
        steps = [t["step"] for t in kappa_trace if name in t["kappa"]]
        vals = [t["kappa"][name] for t in kappa_trace if name in t["kappa"]]
        ax.plot(steps, vals, label=name, lw=1.2, color=color, linestyle=style)
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("training step")
    ax.set_ylabel("κ(S) (after each truncation)")
    ax.set_title(title or "Condition number of the cores")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6, ncol=1 + len(names) // 20, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return _save(fig, path)


def plot_spectra(spectra: dict[str, list[float]], path: Path, title: str) -> Path | None:
    """Singular spectra of one layer for several models (the paper's Fig. 1)."""
    if not spectra:
        return None
    fig = _figure(7, 4)
    ax = fig.add_subplot()
    for label, sigma in spectra.items():
        if sigma:
            ax.semilogy(range(1, len(sigma) + 1), sigma, label=f"{label} (κ={sigma[0] / max(sigma[-1], 1e-30):.3g})")
    ax.set_xlabel("index i")
    ax.set_ylabel("σ_i")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_accuracy_vs_eps(results: Mapping[str, Any], path: str | Path, eps_unit: str = "pixel") -> Path | None:
    """Accuracy vs ε, one panel per attack (each attack has its own threat model and ε scale),
    one line per model (e.g. dense, compressed). ``results`` maps a model label to an
    :class:`~compressor.evaluate.EvalResult` or its ``to_dict()``. Each curve starts at ε = 0
    with the clean accuracy on the attacked images."""

    def get(r: Any, name: str) -> Any:
        return r.get(name) if isinstance(r, Mapping) else getattr(r, name)

    attacks = list(dict.fromkeys(k for r in results.values() for k in (get(r, "adversarial_accuracy") or {})))
    if not attacks:
        return None
    cols = min(3, len(attacks))
    rows = -(-len(attacks) // cols)
    fig = _figure(3.6 * cols, 3.0 * rows + 0.4)
    styles = _line_styles(len(results))
    for i, attack in enumerate(attacks):
        ax = fig.add_subplot(rows, cols, i + 1)
        for (label, r), (color, style) in zip(results.items(), styles):
            accs = (get(r, "adversarial_accuracy") or {}).get(attack)
            if not accs:
                continue
            pts = sorted((float(e), a) for e, a in accs.items())
            clean = get(r, "clean_accuracy_attacked")
            if pts[0][0] > 0 and clean is not None and math.isfinite(clean):
                pts.insert(0, (0.0, clean))
            ax.plot(
                [p[0] for p in pts], [100 * p[1] for p in pts], marker="o", color=color, linestyle=style, label=label
            )
        ax.set_title(attack, fontsize=10)
        ax.set_xlabel(f"ε ({eps_unit} units)")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    return _save(fig, Path(path))
