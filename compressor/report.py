"""The run report: report.json (machine-readable), report.md (for people) and plots (PNG)."""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path
from typing import Any

from . import atomic


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

    info: dict[str, Any] = {"device": str(device), "platform": platform.platform(), "cpu_count": os.cpu_count(),
                            "torch_threads": torch.get_num_threads()}
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _fmt_acc(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.2f}"


def _eps_keys(report: dict[str, Any]) -> list[tuple[str, str]]:
    keys: list[tuple[str, str]] = []
    for side in ("dense", "compressed"):
        for attack, per_eps in (report.get(side, {}).get("adversarial_accuracy") or {}).items():
            for eps in per_eps:
                if (attack, eps) not in keys:
                    keys.append((attack, eps))
    return keys


def summary_table(report: dict[str, Any]) -> str:
    """Dense vs compressed, side by side, as a Markdown table."""
    dense, comp = report.get("dense", {}), report.get("compressed", {})
    rows = [("", "dense", "compressed"),
            ("parameters", f"{dense.get('params', 0):,}", f"{comp.get('params', 0):,}"),
            ("compression rate (%)", "0.00", f"{comp.get('compression_rate', 0.0):.2f}"),
            ("clean accuracy (%)", _fmt_acc(dense.get("clean_accuracy")), _fmt_acc(comp.get("clean_accuracy")))]
    unit = report.get("eps_unit", "pixel")
    for attack, eps in _eps_keys(report):
        d = (dense.get("adversarial_accuracy") or {}).get(attack, {}).get(eps)
        c = (comp.get("adversarial_accuracy") or {}).get(attack, {}).get(eps)
        rows.append((f"{attack} ε={eps} ({unit}) (%)", _fmt_acc(d), _fmt_acc(c)))
    if dense.get("nonfinite_steps") or comp.get("nonfinite_steps"):  # shown only when it happened
        rows.append(("training steps skipped (NaN/Inf)", str(dense.get("nonfinite_steps", 0)),
                     str(comp.get("nonfinite_steps", 0))))
    out = [f"| {' | '.join(rows[0])} |", "|---|---:|---:|"]
    out += [f"| {' | '.join(r)} |" for r in rows[1:]]
    return "\n".join(out)


def layers_table(report: dict[str, Any]) -> str:
    layers = report.get("compressed", {}).get("layers", {})
    if not layers:
        return "_no factorized layers_"
    out = ["| layer | ranks | κ | R(S) |", "|---|---|---:|---:|"]
    for name, d in layers.items():
        kappa = d.get("condition_number")
        out.append(f"| {name} | {','.join(map(str, d.get('ranks', [d.get('rank')])))} | "
                   f"{'inf' if kappa is None else f'{kappa:.3g}'} | {d.get('regularizer', float('nan')):.3g} |")
    return "\n".join(out)


def render_markdown(report: dict[str, Any]) -> str:
    r = report
    parts = [f"# compressor run `{r.get('run_name', '')}`", "",
             f"Model `{r.get('model', {}).get('spec', '')}` on `{r.get('data', {}).get('name', '')}` "
             f"({r.get('data', {}).get('n_train', '?')} train / {r.get('data', {}).get('n_val', '?')} validation images), "
             f"β = {r.get('recipe', {}).get('train', {}).get('beta')}, τ = {r.get('recipe', {}).get('train', {}).get('tau')}. "
             f"Device: {r.get('device', {}).get('device')}.", "",
             "## Dense vs compressed", "", summary_table(r), "",
             f"Adversarial accuracies on the first {r.get('compressed', {}).get('n_attacked', '?')} validation images, "
             f"same attack seeds for both models; ε in {r.get('eps_unit', 'pixel')} units.", "",
             "## Factorized layers (final ranks, condition numbers)", "", layers_table(r), ""]
    exp = r.get("export") or {}
    if exp:
        parts += ["## Export", "", "```json", json.dumps(exp, indent=2, default=str), "```", ""]
    parts += ["## Time per stage (s)", "", "| stage | seconds |", "|---|---:|"]
    parts += [f"| {k} | {v:.1f} |" for k, v in (r.get("timings") or {}).items()]
    plots = r.get("plots") or {}
    if plots:
        parts += ["", "## Plots", ""] + [f"![{k}]({v})" for k, v in plots.items()]
    return "\n".join(parts) + "\n"


def write_report(folder: Path, report: dict[str, Any]) -> None:
    atomic.write_text(folder / "report.json", json.dumps(_jsonable(report), indent=2, allow_nan=False) + "\n")
    atomic.write_text(folder / "report.md", render_markdown(report))


def _jsonable(obj: Any) -> Any:
    """JSON without NaN/Inf (they become null) and with plain types."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if hasattr(obj, "item"):
        return _jsonable(obj.item())
    return str(obj)


# ----------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_kappa(kappa_trace: list[dict[str, Any]], path: Path, title: str = "") -> Path | None:
    """κ(S) of every factorized layer over training (the paper's Fig. 2)."""
    if not kappa_trace:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(kappa_trace[-1]["kappa"])
    for name in names:
        steps = [t["step"] for t in kappa_trace if name in t["kappa"]]
        vals = [t["kappa"][name] for t in kappa_trace if name in t["kappa"]]
        ax.plot(steps, vals, label=name, lw=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("κ(S) (after each truncation)")
    ax.set_title(title or "Condition number of the cores")
    ax.grid(alpha=0.3, which="both")
    if len(names) <= 16:
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path


def plot_spectra(spectra: dict[str, list[float]], path: Path, title: str) -> Path | None:
    """Normalized singular spectra of one layer for several models (the paper's Fig. 1)."""
    if not spectra:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, sigma in spectra.items():
        if sigma:
            ax.semilogy(range(1, len(sigma) + 1), sigma, label=f"{label} (κ={sigma[0] / max(sigma[-1], 1e-30):.3g})")
    ax.set_xlabel("index i")
    ax.set_ylabel("σ_i")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path
