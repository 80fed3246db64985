"""Writing an evaluation's results: ``summary.json``, ``summary.md`` (a Markdown table) and two plots.

Every file goes through :func:`idanimator.files.atomic_path`, so an interrupted run never leaves half a file.
The plots use matplotlib's object API with the Agg canvas (no display, no global pyplot state).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..files import atomic_path
from .metrics import CLIP_METRICS, DESCRIPTIONS, FACE_METRICS, FACE_RATE

SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
IDENTITY_PLOT = "identity_per_frame.png"
DISTRIBUTION_PLOT = "metric_distributions.png"


def _fmt(metric: str, value) -> str:
    if value is None:
        return "n/a"
    if metric in ("CLIPScore", "FlowMagnitude"):
        return f"{value:.2f}"
    return f"{value:.3f}"


def write_json(summary: dict, out: Path) -> Path:
    path = out / SUMMARY_JSON
    with atomic_path(path) as temp:
        temp.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def markdown(summary: dict) -> str:
    keys = summary["columns"]
    lines = [
        f"# Evaluation of {summary['counts']['videos']} videos",
        "",
        *_who_measured(summary["setup"]),
        "| video | " + " | ".join(_label(k, summary["setup"]) for k in keys) + " |",
        "|---|" + "---:|" * len(keys),
        "| **mean** | " + " | ".join(f"**{_fmt(k, summary[k])}**" for k in keys) + " |",
    ]
    for video in summary["videos"]:
        if video.get("error"):
            lines.append(f"| {video['name']} | {video['error']} |" + " |" * (len(keys) - 1))
        else:
            lines.append(f"| {video['name']} | " + " | ".join(_fmt(k, video.get(k)) for k in keys) + " |")
    lines += ["", "## Metrics", ""]
    lines += [f"- **{k}**: {DESCRIPTIONS[k]}." for k in keys]
    if summary["unavailable"]:
        lines += ["", "## Not measured", ""]
        by_reason: dict[str, list[str]] = {}
        for key, reason in summary["unavailable"].items():
            by_reason.setdefault(reason, []).append(key)
        lines += [f"- **{', '.join(keys_)}**: {reason}." for reason, keys_ in by_reason.items()]
    problems = [
        f"- {video['name']}: {text}" for video in summary["videos"] for text in video["warnings"] + video["notes"]
    ]
    if problems:
        lines += ["", "## Per-video warnings and notes", "", *problems]
    if summary.get("notes"):
        lines += ["", "## Notes", "", *(f"- {note}" for note in summary["notes"])]
    setup = summary["setup"]
    lines += ["", "## Set-up", ""]
    lines += [f"- {k}: {v}" for k, v in setup.items() if not isinstance(v, dict)]
    lines += [f"- {k}: {v}" for k, v in setup.get("models", {}).items()]
    return "\n".join(lines) + "\n"


def _label(metric: str, setup: dict) -> str:
    """A column's heading: FaceSim-Arc names its insightface pack (buffalo_l and antelopev2 differ)."""
    return f"{metric} ({setup['arcface_pack']})" if metric == "FaceSim-Arc" and setup.get("arcface_pack") else metric


def _who_measured(setup: dict) -> list[str]:
    """The lines under the title that name the face detector and the ArcFace pack's recognition weights."""
    lines = []
    if setup.get("face_detector"):
        lines.append(f"Faces found by: {setup['face_detector']}.")
    if setup.get("arcface_pack"):
        weights = setup.get("arcface_weights") or "not loaded"
        lines.append(f"ArcFace: insightface {setup['arcface_pack']} pack, {weights}.")
    return [*lines, ""] if lines else []


def write_markdown(summary: dict, out: Path) -> Path:
    path = out / SUMMARY_MD
    with atomic_path(path) as temp:
        temp.write_text(markdown(summary), encoding="utf-8")
    return path


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as temp:
        fig.savefig(temp, format="png", dpi=110, bbox_inches="tight")
    return path


def plot_identity(summary: dict, out: Path) -> Path | None:
    """One panel per face metric: each video's per-frame similarity (gaps where no face) and the mean."""
    from matplotlib.figure import Figure

    metrics = [m for m in FACE_METRICS if m in summary["columns"] and summary[m] is not None]
    if not metrics:
        return None
    fig = Figure(figsize=(5.2 * len(metrics), 3.8))
    for index, metric in enumerate(metrics, start=1):
        ax = fig.add_subplot(1, len(metrics), index)
        rows = [v["per_frame"][metric] for v in summary["videos"] if metric in v.get("per_frame", {})]
        rows = [[math.nan if x is None else x for x in row] for row in rows]
        alpha = max(0.15, min(0.8, 4.0 / max(1, len(rows))))
        for row in rows:
            ax.plot(range(len(row)), row, marker=".", linewidth=1, alpha=alpha)
        if rows:
            width = max(len(r) for r in rows)
            columns = [[r[i] for r in rows if i < len(r) and not math.isnan(r[i])] for i in range(width)]
            mean = [sum(c) / len(c) if c else math.nan for c in columns]
            ax.plot(range(width), mean, color="black", linewidth=2.5, label="mean over videos")
            ax.legend(loc="lower left", fontsize=8)
        ax.set_title(metric)
        ax.set_xlabel("sampled frame")
        ax.set_ylabel("cosine to the reference (clamped at 0)")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    return _save(fig, out / IDENTITY_PLOT)


def plot_distributions(summary: dict, out: Path) -> Path | None:
    """A histogram of the per-video values of each metric, with the mean marked."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    metrics = [m for m in summary["columns"] if summary[m] is not None]
    if not metrics:
        return None
    cols = min(3, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig = Figure(figsize=(4.4 * cols, 3.2 * rows))
    for index, metric in enumerate(metrics, start=1):
        ax = fig.add_subplot(rows, cols, index)
        values = [v[metric] for v in summary["videos"] if v.get(metric) is not None]
        ax.hist(values, bins=min(20, max(5, len(values))), color="tab:blue" if metric in CLIP_METRICS else "tab:green")
        ax.axvline(summary[metric], color="black", linestyle="--", linewidth=1.5)
        ax.set_title(f"{metric} (mean {_fmt(metric, summary[metric])})", fontsize=10)
        ax.set_ylabel("videos")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        if metric in (*FACE_METRICS, FACE_RATE, "DynamicDegree"):
            ax.set_xlim(-0.02, 1.02)
    fig.tight_layout()
    return _save(fig, out / DISTRIBUTION_PLOT)


def skipped_plots(summary: dict) -> dict[str, str]:
    """The plots that have nothing to show, each with the reason (a note in the summary, and on eval's output)."""
    measured = [m for m in summary["columns"] if summary[m] is not None]
    asked = [m for m in FACE_METRICS if m in summary["columns"]]
    skipped = {}
    if not any(m in measured for m in asked):
        skipped[IDENTITY_PLOT] = (
            "no face metric was asked for (--metrics)"
            if not asked
            else f'no face metric could be measured ({", ".join(asked)}: see why under "unavailable")'
        )
    if not measured:
        skipped[DISTRIBUTION_PLOT] = "no metric could be measured"
    return skipped


def write_all(summary: dict, out: Path) -> list[Path]:
    """Write every output; a plot that is not drawn (nothing to show, or no matplotlib) is noted in the summary
    instead, and an older run's file of that name is removed, so the folder never shows another run's plot."""
    written = []
    skipped = skipped_plots(summary)
    try:
        written += [p for p in (plot_identity(summary, out), plot_distributions(summary, out)) if p]
    except ImportError:
        skipped = {
            name: "matplotlib is not installed (pip install matplotlib)" for name in (IDENTITY_PLOT, DISTRIBUTION_PLOT)
        }
    for name, reason in skipped.items():
        (out / name).unlink(missing_ok=True)
        summary["notes"].append(f"{name} was not drawn: {reason}")
    return [write_json(summary, out), write_markdown(summary, out), *written]
