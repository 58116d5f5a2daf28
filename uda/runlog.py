"""What a run folder tells a person: `train.log` (Python logging), the per-step losses written out
(`train_losses.jsonl`, not kept in memory), loss and metric curves as PNG (`curves/`), throughput and peak
memory, and a progress bar for validation."""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from uda.files import write_text_atomic
from uda.hardware import proc_status_mib

LOGGER = "uda"
LOSSES_FILE = "train_losses.jsonl"
CURVES = "curves"
RECENT_ROWS = 1000  # per-step rows kept in memory (the whole run is in LOSSES_FILE)
# Validation metrics drawn as curves and tabled in report.md, when present.
MAIN_METRICS = (
    "semseg/miou",
    "semseg/pixel_acc",
    "depth/rmse",
    "depth/abs_rel",
    "depth/a1",
    "normals/mean",
    "normals/within_11.25",
    "edges/f1",
    "edges/f1_edge",
)


class _TqdmHandler(logging.Handler):
    """Console lines that do not break a tqdm progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stdout)


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory of this process in MiB: allocated GPU memory on CUDA, the resident set's high-water mark
    (VmHWM) on CPU; 0 where unknown."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return proc_status_mib("VmHWM") or 0.0


class RunLog:
    """The run's text log and loss file. Only the main process writes; every process keeps its recent rows."""

    def __init__(self, out: Path, main: bool) -> None:
        self.out, self.main = Path(out), main
        self.recent: list[dict[str, float]] = []  # the newest RECENT_ROWS per-step rows of this process
        self.logger = logging.getLogger(LOGGER)
        self._handlers: list[logging.Handler] = []
        self._losses = None
        if main:
            self.logger.setLevel(logging.INFO)
            self.logger.propagate = False
            for old in [h for h in self.logger.handlers if getattr(h, "uda_run", False)]:
                self.logger.removeHandler(old)  # a previous Trainer of this process
            file = logging.FileHandler(self.out / "train.log", encoding="utf-8")
            file.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
            console = _TqdmHandler()
            for handler in (file, console):
                handler.uda_run = True
                self.logger.addHandler(handler)
                self._handlers.append(handler)

    def info(self, message: str) -> None:
        """A line for train.log and the console (main process only)."""
        if self.main:
            self.logger.info(message)

    def warning(self, message: str) -> None:
        """A warning line for train.log and the console (main process only)."""
        if self.main:
            self.logger.warning(message if message.startswith("warning") else f"warning: {message}")

    def progress(
        self, step: int, iterations: int, last: Mapping[str, float], speed: Mapping[str, float]
    ) -> None:
        """The training log line of a step: losses, throughput and peak memory."""
        losses = " ".join(
            f"{k[5:]}={v:.4g}" for k, v in last.items() if k.startswith("loss/") and _main_loss(k)
        )
        self.info(
            f"step {step}/{iterations} {losses} grad_norm={last.get('grad_norm', math.nan):.3g} "
            f"{speed['it_per_s']:.3g} it/s {speed['images_per_s']:.3g} images/s "
            f"peak memory {speed['peak_mem_mib']:.0f} MiB"
        )

    @staticmethod
    def summary(results: Mapping[str, Mapping[str, float]]) -> str:
        """The main metrics of a validation in one line."""
        parts = [
            f"{name}/{m}={metrics[m]:.4g}"
            for name, metrics in results.items()
            for m in MAIN_METRICS
            if m in metrics
        ]
        return " ".join(parts)

    # ------------------------------------------------------------------ per-step losses

    def expected(self, steps: int, remaining: int, seconds: float) -> None:
        """Say early what the run will cost: the time of `steps` warm steps, extrapolated to the rest."""
        per_step = seconds / max(1, steps)
        total = per_step * remaining
        when = f"{total / 60:.1f} min" if total >= 60 else f"{total:.0f} s"
        self.info(
            f"expected: {remaining} more steps at {per_step:.2f} s/step, about {when} before the final evaluation"
        )

    def start(self, step: int) -> None:
        """Open the loss file for a run (re)starting at `step`: rows after `step` (from a run that went further
        before it was stopped) are dropped, so the file follows the resumed run."""
        if not self.main:
            return
        path = self.out / LOSSES_FILE
        if path.is_file():
            kept = [line for line in path.read_text().splitlines() if _row_step(line) <= step]
            write_text_atomic(path, "".join(f"{line}\n" for line in kept))
        self._losses = path.open("a", encoding="utf-8")

    def record(self, row: Mapping[str, float]) -> None:
        """One step's losses: to the loss file (main process) and the recent rows."""
        self.recent.append(dict(row))
        if len(self.recent) > 2 * RECENT_ROWS:
            del self.recent[:-RECENT_ROWS]
        if self._losses is not None:
            self._losses.write(json.dumps({k: _finite(v) for k, v in row.items()}) + "\n")

    def flush(self) -> None:
        """Write buffered loss rows to disk."""
        if self._losses is not None:
            self._losses.flush()

    def close(self) -> None:
        """Close the loss file and detach the log handlers."""
        if self._losses is not None:
            self._losses.close()
            self._losses = None
        for handler in self._handlers:
            self.logger.removeHandler(handler)
            handler.close()
        self._handlers = []

    def losses(self) -> list[dict[str, Any]]:
        """Every row of the loss file."""
        path = self.out / LOSSES_FILE
        self.flush()
        return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []

    # ------------------------------------------------------------------ figures

    def curves(self, history: Sequence[Mapping[str, Any]]) -> list[str]:
        """Write curves/losses.png (per-step losses, smoothed) and curves/metrics.png (validation history);
        the paths written, relative to the run folder."""
        if not self.main:
            return []
        folder = self.out / CURVES
        folder.mkdir(exist_ok=True)
        written = []
        rows = self.losses()
        keys = [k for k in dict.fromkeys(k for r in rows for k in r) if _main_loss(k)]
        if rows and keys:
            series = {k: [(r["step"], r[k]) for r in rows if r.get(k) is not None] for k in keys}
            series = {k: _smooth(v) for k, v in series.items() if v}
            draw_panels({"training losses (smoothed)": series}, folder / "losses.png", log_y=True)
            written.append(f"{CURVES}/losses.png")
        panels = {}
        for metric in MAIN_METRICS:
            sets = sorted({k.rsplit("/", 2)[0] for r in history for k in r if k.endswith("/" + metric)})
            lines = {
                name: [(r["step"], r[f"{name}/{metric}"]) for r in history if f"{name}/{metric}" in r]
                for name in sets
            }
            if any(lines.values()):
                panels[metric] = lines
        if panels:
            draw_panels(panels, folder / "metrics.png")
            written.append(f"{CURVES}/metrics.png")
        return written


def _row_step(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62  # a damaged line (killed mid-write) is dropped


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _main_loss(key: str) -> bool:
    """Loss keys drawn: totals and final-scale terms (the intermediate scales would crowd the plot)."""
    return key.startswith("loss/") and not any(key.endswith(f"/s{s}") for s in range(1, 8))


def _smooth(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Moving average over about 1/50 of the run."""
    window = max(1, len(points) // 50)
    if window == 1:
        return points
    xs, ys = zip(*points)
    kernel = np.ones(window) / window
    smooth = np.convolve(ys, kernel, mode="valid")
    return list(zip(xs[window - 1 :], smooth))


def validation_progress(batches: Iterable, desc: str, total: int | None, main: bool) -> Iterable:
    """Validation batches behind a progress bar that disappears when done (main process only)."""
    return tqdm(batches, desc=desc, total=total, leave=False, disable=not main, dynamic_ncols=True)


def history_table(history: Sequence[Mapping[str, Any]]) -> str:
    """The validation history as a Markdown table: one row per validation, the main metrics as columns."""
    columns = [
        k
        for k in dict.fromkeys(k for r in history for k in r)
        if k != "step" and any(k.endswith("/" + m) for m in MAIN_METRICS)
    ]
    if not history or not columns:
        return ""
    lines = ["| step | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for r in history:
        cells = [f"{r[c]:.4f}" if isinstance(r.get(c), (int, float)) else "" for c in columns]
        lines.append(f"| {r['step']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------ drawing (OpenCV: no plotting dependency)

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
PALETTE += [(227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def draw_panels(
    panels: Mapping[str, Mapping[str, list[tuple[float, float]]]],
    path: Path,
    log_y: bool = False,
    panel_size: tuple[int, int] = (300, 520),
) -> None:
    """Line plots, one panel per title (two columns), each with its named series and a legend; a PNG at path."""
    import cv2

    h, w = panel_size
    cols = 1 if len(panels) == 1 else 2
    canvas = np.full((math.ceil(len(panels) / cols) * h, cols * w, 3), 255, np.uint8)
    for index, (title, series) in enumerate(panels.items()):
        y0, x0 = (index // cols) * h, (index % cols) * w
        _draw_panel(canvas, (x0 + 62, y0 + 26, x0 + w - 12, y0 + h - 34), title, series, log_y)
    cv2.imwrite(str(path), canvas)


def _draw_panel(
    canvas: np.ndarray,
    box: tuple[int, int, int, int],
    title: str,
    series: Mapping[str, list[tuple[float, float]]],
    log_y: bool,
) -> None:
    """One line plot into canvas: axes inside box (left, top, right, bottom), ticks, title, lines and legend."""
    import cv2

    left, top, right, bottom = box
    font, black = cv2.FONT_HERSHEY_SIMPLEX, (0, 0, 0)
    points = [(x, y) for line in series.values() for x, y in line if y is not None and math.isfinite(y)]
    log = log_y and bool(points) and all(y > 0 for _, y in points)
    xs = [x for x, _ in points] or [0.0, 1.0]
    ys = [math.log10(y) if log else y for _, y in points] or [0.0, 1.0]
    xmin, xmax = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    pad = 0.05 * (max(ys) - min(ys)) if max(ys) > min(ys) else 0.5
    ymin, ymax = min(ys) - pad, max(ys) + pad
    to_u = np.poly1d([(right - left) / (xmax - xmin), left - xmin * (right - left) / (xmax - xmin)])
    to_v = np.poly1d([-(bottom - top) / (ymax - ymin), bottom + ymin * (bottom - top) / (ymax - ymin)])
    cv2.rectangle(canvas, (left, top), (right, bottom), black, 1)
    cv2.putText(canvas, title + (" (log)" if log else ""), (left, top - 8), font, 0.45, black, 1)
    for i in range(5):
        fy, fx = ymin + (ymax - ymin) * i / 4, xmin + (xmax - xmin) * i / 4
        v, u = int(round(to_v(fy))), int(round(to_u(fx)))
        cv2.line(canvas, (left - 4, v), (left, v), black, 1)
        cv2.putText(canvas, f"{10**fy if log else fy:.3g}", (left - 58, v + 4), font, 0.35, black, 1)
        cv2.line(canvas, (u, bottom), (u, bottom + 4), black, 1)
        cv2.putText(canvas, f"{fx:.3g}", (u - 12, bottom + 16), font, 0.35, black, 1)
    cv2.putText(canvas, "step", (right - 30, bottom + 28), font, 0.35, black, 1)
    for k, (name, line) in enumerate(series.items()):
        colour = PALETTE[k % len(PALETTE)][::-1]  # OpenCV draws BGR
        kept = [(x, y) for x, y in line if y is not None and math.isfinite(y) and (y > 0 or not log)]
        pts = [(int(round(to_u(x))), int(round(to_v(math.log10(y) if log else y)))) for x, y in kept]
        if len(pts) > 1:
            cv2.polylines(canvas, [np.array(pts, np.int32)], False, colour, 1, cv2.LINE_AA)
        for p in pts if len(pts) < 30 else ():
            cv2.circle(canvas, p, 2, colour, -1)
        ly = top + 12 + 13 * k
        cv2.line(canvas, (right - 150, ly - 4), (right - 135, ly - 4), colour, 2)
        cv2.putText(canvas, name[:24], (right - 130, ly), font, 0.35, black, 1, cv2.LINE_AA)


def flat_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, int | float | str | bool]:
    """A config dict as flat `section.key` -> scalar hyper-parameters for the trackers (tuples, lists and None as
    strings; an empty or absent section as "none")."""
    flat: dict[str, int | float | str | bool] = {}
    for key, value in config.items():
        if isinstance(value, Mapping) and value:
            flat.update(flat_config(value, f"{prefix}{key}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[f"{prefix}{key}"] = value
        elif value is None or isinstance(value, Mapping):
            flat[f"{prefix}{key}"] = "none"
        else:
            flat[f"{prefix}{key}"] = (
                ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)
            )
    return flat


def images_per_iteration(cfg, uses_domain, num_processes: int) -> int:
    """Images one iteration trains on, all processes: every used domain's batch, every micro-batch."""
    per_step = sum(d.batch_size for i, d in enumerate((cfg.data, cfg.target)) if uses_domain(i))
    return per_step * cfg.train.grad_accum * num_processes
