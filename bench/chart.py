"""One PNG: each row's ratio (ours / baseline) as a bar, its goal as a black mark.

Drawn with matplotlib (Agg, no screen); labels are wrapped and the figure is saved with
a tight bounding box, so nothing is cut off. The ratio axis is logarithmic: the rows
span 0.1x to 20x and a ratio's distance from its goal reads the same on either side.
"""

from __future__ import annotations

import math
import re
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter

from bench.common import Row

GREEN, RED, GREY = "#3ca05a", "#c8463c", "#969696"
LABEL_WIDTH = 58  # characters per line of a row's label


def draw(rows: list[Row], path: Path) -> Path:
    labels = [textwrap.fill(f"{r.scenario}: {r.metric}", LABEL_WIDTH) for r in rows]
    ratios = [_finite(r.ratio) for r in rows]
    goals = [_goal_value(r.goal) for r in rows]
    colours = [
        GREY if g is None else GREEN if r.met else RED for r, g in zip(rows, goals, strict=True)
    ]
    lines = sum(label.count("\n") + 1 for label in labels)
    fig, ax = plt.subplots(
        figsize=(12, 1.5 + 0.32 * lines + 0.12 * len(rows)), layout="constrained"
    )
    y = list(range(len(rows)))
    ax.barh(y, ratios, color=colours, height=0.6)
    for i, (ratio, goal, row) in enumerate(zip(ratios, goals, rows, strict=True)):
        ax.annotate(
            f"{row.ratio:.2f}x  (goal {row.goal})" if goal else f"{row.ratio:.2f}x",
            (max(ratio, goal or 0.0), i),  # right of the bar and of its goal mark
            xytext=(4, 0),
            textcoords="offset points",
            va="center",
            fontsize=8,
        )
        if goal:
            ax.plot([goal, goal], [i - 0.4, i + 0.4], color="black", linewidth=2)
    ax.set_xscale("log")
    values = [v for v in ratios + [g for g in goals if g] if v > 0]
    ax.set_xlim(min([*values, 1.0]) / 1.5, max([*values, 1.0]) * 6)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}x"))
    ax.axvline(1.0, color="#bbbbbb", linewidth=1, linestyle="--", zorder=0)
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ours / baseline (log scale; dashed line: 1x)")
    ax.set_title("kontext-queue `make bench`: ratio per row against its goal")
    fig.legend(
        handles=[
            Patch(color=GREEN, label="goal met"),
            Patch(color=RED, label="goal missed"),
            Patch(color=GREY, label="no goal (shown)"),
            Line2D([0], [0], color="black", linewidth=2, label="goal"),
        ],
        loc="outside lower center",
        ncol=4,
        fontsize=8,
    )
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _finite(ratio: float) -> float:
    return ratio if math.isfinite(ratio) and ratio > 0 else 1e-3


def _goal_value(goal: str) -> float | None:
    match = re.search(r"([0-9.]+)x", goal)
    return float(match.group(1)) if match else None
