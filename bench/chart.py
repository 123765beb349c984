"""One PNG: each row's ratio against its goal, drawn with Pillow (no plotting stack)."""

from __future__ import annotations

import re
from pathlib import Path

from PIL import Image, ImageDraw

from bench.common import Row

WIDTH, ROW_H, LEFT, PAD = 900, 44, 330, 20
GREEN, RED, GREY = (60, 160, 90), (200, 70, 60), (150, 150, 150)


def draw(rows: list[Row], path: Path) -> Path:
    height = PAD * 3 + ROW_H * max(1, len(rows))
    image = Image.new("RGB", (WIDTH, height), "white")
    pen = ImageDraw.Draw(image)
    pen.text((PAD, PAD // 2), "ours / baseline (bar), goal (line)", fill="black")
    finite = [r.ratio for r in rows if r.ratio != float("inf")]
    goals = [_goal_value(r.goal) for r in rows]
    scale_max = max([1.0, *finite, *[g for g in goals if g]]) * 1.1
    span = WIDTH - LEFT - PAD * 2
    for i, row in enumerate(rows):
        top = PAD * 2 + i * ROW_H
        pen.text((PAD, top + 8), f"{row.scenario}: {row.metric}"[:48], fill="black")
        bar = min(row.ratio, scale_max) / scale_max * span
        goal = goals[i]
        # Grey for a row without a goal: it is neither a pass nor a miss.
        colour = GREY if goal is None else GREEN if row.met else RED
        pen.rectangle([LEFT, top + 4, LEFT + bar, top + ROW_H - 10], fill=colour)
        pen.text((LEFT + bar + 6, top + 8), f"{row.ratio:.2f}x", fill="black")
        if goal:
            x = LEFT + goal / scale_max * span
            pen.line([x, top, x, top + ROW_H - 6], fill="black", width=2)
    image.save(path)
    return path


def _goal_value(goal: str) -> float | None:
    match = re.search(r"([0-9.]+)x", goal)
    return float(match.group(1)) if match else None
