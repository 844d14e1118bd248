"""python -m sparsetrain.report RUN_DIR [RUN_DIR ...] [--out DIR]: report.md with PNG plots.

Built only from what each run saved (summary.json, config.yaml, csv/metrics.csv), so a report can be
made long after training, on a laptop with neither the data nor a GPU. A RUN_DIR may also be a sweep
root (runs/sweeps/NAME); it stands for every job directory under it.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import sys
import textwrap
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean
from typing import Callable, Optional

import yaml
from matplotlib import colormaps
# Figure without pyplot renders PNGs through Agg: no GUI backend is picked and no global state kept.
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

SUMMARY = "summary.json"
CONFIG = "config.yaml"
METRICS = Path("csv") / "metrics.csv"
FIGURES = "figures"
DPI = 110
LEGEND_CHARS_PER_INCH = 10  # 10 pt legend text
LEGEND_ROW_INCHES = 0.22
TITLE_CHARS_PER_INCH = 9  # 12 pt title text
LEGEND_LABEL_CHARS = 36  # a legend beside the axes: longer labels wrap instead of squeezing the plot

# What a method is called in tables and legends, and the fraction of weights it prunes.
METHOD_NAMES = {"dense": "dense", "semi24": "2:4", "act24": "act 2:4"}
PATTERN_LEVELS = {"dense": 0.0, "semi24": 0.5, "act24": 0.5}
CRITERION_NAMES = {"scores": "DRESS"}
METHOD_ORDER = ["dense", "2:4", "act 2:4", "block/magnitude", "block/DRESS"]
PATTERN_COLORS = {"semi24": "tab:blue", "act24": "tab:orange", "block": "tab:green", "dense": "tab:gray"}
BLOCK_SIZE_MARKERS = ["s", "^", "D", "v", "P", "X", "*"]
NO_BLOCK_MARKER = "o"

# Settings that say where a run lives or how it was started, not what it trains.
PLACE_KEYS = ("run_name", "resume", "force_resume")
PLACE_PREFIXES = ("paths.",)
# Drawn as the x axis and the marker of the accuracy-against-sparsity plot, not told apart by its lines.
LEVEL_KEY = "sparsity.sparsity"
BLOCK_SIZE_KEY = "sparsity.block_size"

RUN_DIR_HINT = "a run directory written by train.py (with summary.json) or a sweep root (runs/sweeps/NAME)"


class ReportError(ValueError):
    """An input path that is missing, empty, or not what a run directory holds."""


class NothingToPlot(Exception):
    """A plot whose data no run logged; the report says why instead of drawing it."""


@dataclass
class Run:
    path: Path
    label: str
    summary: dict
    config: dict
    # metric column of csv/metrics.csv -> (steps, values), only the rows where it was logged
    series: dict

    @property
    def pattern(self) -> str:
        return self.config["sparsity"]["pattern"]

    @property
    def method(self) -> str:
        if self.pattern == "block":
            criterion = self.config["sparsity"].get("criterion", "magnitude")
            return f"block/{CRITERION_NAMES.get(criterion, criterion)}"
        return METHOD_NAMES.get(self.pattern, self.pattern)

    @property
    def level(self) -> Optional[float]:
        if self.pattern == "block":
            return float(self.config["sparsity"]["sparsity"])
        return PATTERN_LEVELS.get(self.pattern)

    @property
    def block_size(self) -> Optional[int]:
        return self.config["sparsity"]["block_size"] if self.pattern == "block" else None

    @property
    def val_acc(self) -> Optional[float]:
        return self.summary.get("metrics", {}).get("val/acc")

    @property
    def settings(self) -> dict:
        """The resolved config as dotted keys."""
        return flatten(self.config)


def flatten(config: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
    return flat


def differing_settings(runs: list) -> list:
    """Dotted config keys whose values differ between the runs, leaving out the seed (and values that follow
    it, such as data.seed) and where each run lives (run name, paths, values inside the run's own directory)."""
    flats = [run.settings for run in runs]
    keys = dict.fromkeys(key for flat in flats for key in flat)
    return [key for key in keys
            if len({repr(flat.get(key)) for flat in flats}) > 1
            and key not in PLACE_KEYS and not key.startswith(PLACE_PREFIXES)
            and not all(flat.get(key) == flat.get("seed") for flat in flats)
            and not all(_inside(flat.get(key), flat.get("paths.run_dir")) for flat in flats)]


def _inside(value, run_dir) -> bool:
    return isinstance(value, str) and isinstance(run_dir, str) and Path(run_dir) in (Path(value), *Path(value).parents)


def comparison_groups(runs: list) -> dict:
    """Runs that differ only in the seed and the sparsity level, by a label: the method, plus the settings that
    tell runs of one method apart (an LR sweep's optim.lr, ...). Each group is one line of the accuracy plot,
    and only its seeds are averaged."""
    keys = [key for key in differing_settings(runs) if key != LEVEL_KEY]
    by_method = defaultdict(list)
    for run in runs:
        by_method[(run.method, run.block_size)].append(run.settings)
    # Settings that change only with the method (the pattern, its options, the recipe) are in its name already.
    told_apart = [key for key in keys if key != BLOCK_SIZE_KEY and any(
        len({repr(flat.get(key)) for flat in flats}) > 1 for flats in by_method.values())]
    groups = defaultdict(list)
    for run in sorted(runs, key=lambda run: _method_rank(run.method)):
        flat = run.settings
        label = ", ".join([run.method, *(f"{key}={flat.get(key)}" for key in told_apart)])
        groups[label].append(run)
    return dict(groups)


# ---------------------------------------------------------------- reading run directories


def find_run_dirs(paths) -> list:
    """Each path as given, or a sweep root's job directories; each run once, in the order given."""
    found = {}
    for path in map(Path, paths):
        for run_dir in _run_dirs_at(path):
            found.setdefault(run_dir.resolve(), run_dir)
    return list(found.values())


def _run_dirs_at(path: Path) -> list:
    if not path.exists():
        raise ReportError(f"{path} does not exist; expected {RUN_DIR_HINT}")
    if not path.is_dir():
        raise ReportError(f"{path} is a file; expected {RUN_DIR_HINT}")
    # Checked first: a sweep root has a summary.json of its own (the sweep table), not a run's.
    jobs = sorted(summary.parent for summary in path.glob(f"*/{SUMMARY}"))
    if jobs:
        return jobs
    if (path / SUMMARY).is_file():
        return [path]
    raise ReportError(f"{path} has no {SUMMARY}, nor any subdirectory with one; expected {RUN_DIR_HINT}")


def load_runs(run_dirs: list) -> list:
    labels = run_labels(run_dirs)
    return [Run(run_dir, label, read_summary(run_dir / SUMMARY), read_config(run_dir / CONFIG),
                read_metrics(run_dir / METRICS)) for run_dir, label in zip(run_dirs, labels)]


def run_labels(run_dirs: list) -> list:
    """Short unique names: the path under the runs' common parent (for one run, recipe/run_name)."""
    if len(run_dirs) == 1:
        return [f"{run_dirs[0].resolve().parent.name}/{run_dirs[0].resolve().name}"]
    root = common_parent(run_dirs)
    return [run_dir.resolve().relative_to(root).as_posix() for run_dir in run_dirs]


def common_parent(run_dirs: list) -> Path:
    return Path(os.path.commonpath([run_dir.resolve() for run_dir in run_dirs]))


def _read_nonempty(path: Path, expected: str) -> str:
    if not path.is_file():
        raise ReportError(f"{path} not found; expected {expected}")
    text = path.read_text()
    if not text.strip():
        raise ReportError(f"{path} is empty; expected {expected}")
    return text


def read_summary(path: Path) -> dict:
    expected = "the JSON object train.py writes when a run ends (recipe, metrics, layers, ...)"
    try:
        summary = json.loads(_read_nonempty(path, expected))
    except json.JSONDecodeError as e:
        raise ReportError(f"{path} is not valid JSON ({e}); expected {expected}") from e
    if not isinstance(summary, dict) or not isinstance(summary.get("metrics"), dict):
        raise ReportError(f"{path} has no 'metrics' object; expected {expected}")
    return summary


def read_config(path: Path) -> dict:
    expected = "the resolved Hydra config train.py saves in the run directory"
    try:
        config = yaml.safe_load(_read_nonempty(path, expected))
    except yaml.YAMLError as e:
        raise ReportError(f"{path} is not valid YAML ({e}); expected {expected}") from e
    sparsity = config.get("sparsity") if isinstance(config, dict) else None
    if not isinstance(sparsity, dict) or "pattern" not in sparsity:
        raise ReportError(f"{path} has no sparsity.pattern; expected {expected}")
    # The level and the block size of a block run come from the config alone.
    missing = [key for key in ("sparsity", "block_size") if sparsity["pattern"] == "block" and key not in sparsity]
    if missing:
        raise ReportError(f"{path} has sparsity.pattern=block but no sparsity.{missing[0]}; expected {expected}")
    return config


def read_metrics(path: Path) -> dict:
    """CSVLogger rows are sparse (each holds the metrics logged at that step), so every column
    becomes its own (steps, values) series of the rows where it has a value."""
    expected = "the CSVLogger metrics of the run (logger=csv writes <run_dir>/csv/metrics.csv)"
    rows = list(csv.DictReader(_read_nonempty(path, expected).splitlines()))
    if rows and "step" not in rows[0]:
        raise ReportError(f"{path} has no 'step' column; expected {expected}")
    series = defaultdict(lambda: ([], []))
    for row in rows:
        for column, cell in row.items():
            if column not in ("step", "epoch") and cell:
                steps, values = series[column]
                steps.append(int(float(row["step"])))
                values.append(float(cell))
    return dict(series)


# ---------------------------------------------------------------- plots


def run_colors(count: int) -> list:
    """Distinct colors: a qualitative palette while it lasts, then evenly spaced along a colormap."""
    if count <= 20:
        return list(colormaps["tab10" if count <= 10 else "tab20"].colors[:count])
    return [colormaps["turbo"](i / (count - 1)) for i in range(count)]


def legend_grid(labels: list, figure_width_in: float) -> tuple:
    """(columns, rows) of a legend under a figure: as many columns as the longest label allows, so a
    sweep's long job names get one column and the figure grows a row per run instead of clipping."""
    widest = max(len(label) for label in labels) + 6  # the line sample and the gap
    columns = max(1, min(len(labels), int(figure_width_in * LEGEND_CHARS_PER_INCH) // widest))
    return columns, math.ceil(len(labels) / columns)


def fitted_title(text: str, figure_width_in: float) -> str:
    """The title wrapped to the figure's width (a sweep job's label alone can be wider)."""
    return textwrap.fill(text, width=int(figure_width_in * TITLE_CHARS_PER_INCH), break_on_hyphens=False)


def plot_curves(runs: list, path: Path) -> None:
    """Loss and accuracy against step; train solid, val dashed with dots, one color per run."""
    panels = [("loss", "train/loss", "val/loss"), ("accuracy", "train/acc", "val/acc")]
    if not any(column in run.series for run in runs for _, *columns in panels for column in columns):
        raise NothingToPlot(f"no run has train/ or val/ loss or accuracy rows in {METRICS.as_posix()}")
    style_handles = [Line2D([], [], color="black", linewidth=1.1, label="train"),
                     Line2D([], [], color="black", linestyle="--", marker="o", markersize=4, label="val")]
    colors = run_colors(len(runs))
    run_handles = [Line2D([], [], color=color, linewidth=3, label=run.label) for run, color in zip(runs, colors)]
    handles = style_handles + run_handles
    columns, rows = legend_grid([handle.get_label() for handle in handles], figure_width_in=11)
    fig = Figure(figsize=(11, 4.2 + LEGEND_ROW_INCHES * rows), layout="constrained")
    for ax, (quantity, train_column, val_column) in zip(fig.subplots(1, 2), panels):
        for run, color in zip(runs, colors):
            if train_column in run.series:
                ax.plot(*run.series[train_column], color=color, linewidth=1.1, alpha=0.85)
            if val_column in run.series:
                ax.plot(*run.series[val_column], color=color, linestyle="--", marker="o", markersize=4)
        ax.set(title=quantity, xlabel="step", ylabel=quantity)
        ax.grid(alpha=0.3)
    fig.legend(handles=handles, loc="outside lower center", ncols=columns, frameon=False)
    fig.savefig(path, dpi=DPI)


def plot_flip_rate(runs: list, path: Path) -> None:
    """Fraction of mask entries that changed at each mask update: it should fall as masks settle."""
    logged = [(run, color) for run, color in zip(runs, run_colors(len(runs))) if "sparsity/flip_rate" in run.series]
    if not logged:
        raise NothingToPlot("no run logged sparsity/flip_rate (it is logged only by runs whose masks are "
                            "recomputed during training; dense runs never log it)")
    columns, rows = legend_grid([run.label for run, _ in logged], figure_width_in=8)
    fig = Figure(figsize=(8, 4.0 + LEGEND_ROW_INCHES * rows), layout="constrained")
    ax = fig.add_subplot()
    for run, color in logged:
        ax.plot(*run.series["sparsity/flip_rate"], color=color, marker=".", label=run.label)
    ax.set(title="mask flip rate", xlabel="step", ylabel="fraction of mask entries changed")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", ncols=columns, frameon=False)
    fig.savefig(path, dpi=DPI)


def plot_layer_sparsity(run: Run, path: Path) -> Figure:
    """One bar per layer with a measured sparsity, in model order; the dashed line is the target."""
    layers = [layer for layer in run.summary.get("layers", []) if layer.get("measured_sparsity") is not None]
    if not layers:
        raise NothingToPlot(f"no layer in {SUMMARY} has a measured sparsity (every layer is dense)")
    unmeasured = len(run.summary["layers"]) - len(layers)
    values = [layer["measured_sparsity"] for layer in layers]
    fig = Figure(figsize=(8, 1.6 + 0.26 * len(layers)), layout="constrained")
    ax = fig.add_subplot()
    ax.barh(range(len(layers)), values, color=[PATTERN_COLORS.get(layer["pattern"], "tab:red") for layer in layers])
    for row, value in enumerate(values):
        ax.text(value + 0.01, row, f"{value:.2f}", va="center", fontsize=8)
    ax.set_yticks(range(len(layers)), [layer["name"] for layer in layers], fontsize=8)
    ax.set_ylim(len(layers) - 0.5, -0.5)  # model order top to bottom, no empty rows at the ends
    ax.set_xlim(0, 1.1)
    patterns = dict.fromkeys(layer["pattern"] for layer in layers)
    handles = [Patch(color=PATTERN_COLORS.get(pattern, "tab:red"), label=pattern) for pattern in patterns]
    if run.level:
        handles.append(ax.axvline(run.level, color="black", linestyle="--", linewidth=1, label=f"target {run.level:g}"))
    # Below the axes: inside, it would cover the value labels of bars near 1.
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8, frameon=False)
    note = f"; {unmeasured} dense layers not shown" if unmeasured else ""
    ax.set(title=fitted_title(f"{run.label}: measured sparsity per layer{note}", figure_width_in=8),
           xlabel="fraction of weights pruned")
    ax.grid(axis="x", alpha=0.3)
    fig.savefig(path, dpi=DPI)
    return fig


def plot_accuracy_vs_sparsity(runs: list, path: Path) -> None:
    """Final val/acc against sparsity level: one color per group of runs alike but for the seed and the level
    (comparison_groups), one marker per block size; a line joins a group's mean accuracy at each level, and a
    dense group's mean is a dotted line across."""
    plotted = [run for run in runs if run.level is not None and run.val_acc is not None]
    if len(plotted) < 2:
        raise NothingToPlot(f"needs val/acc in {SUMMARY} and a known sparsity level for two or more runs")
    groups = comparison_groups(plotted)
    block_sizes = sorted({run.block_size for run in plotted if run.block_size is not None})
    marker_of = {None: NO_BLOCK_MARKER, **{b: BLOCK_SIZE_MARKERS[i % len(BLOCK_SIZE_MARKERS)]
                                          for i, b in enumerate(block_sizes)}}
    fig = Figure(figsize=(8.5, 4.6), layout="constrained")
    ax = fig.add_subplot()
    handles = []
    for (label, group), color in zip(groups.items(), run_colors(len(groups))):
        for block_size in dict.fromkeys(run.block_size for run in group):
            _plot_mean_by_level(ax, [run for run in group if run.block_size == block_size], color=color,
                                marker=marker_of[block_size])
        if all(run.method == "dense" for run in group):
            ax.axhline(fmean(run.val_acc for run in group), color=color, linestyle=":", linewidth=1)
        handles.append(Line2D([], [], color=color, linewidth=2.5, label=textwrap.fill(label, LEGEND_LABEL_CHARS)))
    if any(run.method == "dense" for run in plotted):
        handles.append(Line2D([], [], color="gray", linestyle=":", linewidth=1, label="dense baseline"))
    if block_sizes:
        handles += [Line2D([], [], color="black", linestyle="", marker=marker_of[b], label=f"block size {b}")
                    for b in block_sizes]
        if any(run.block_size is None for run in plotted):
            handles.append(Line2D([], [], color="black", linestyle="", marker=NO_BLOCK_MARKER, label="no blocks"))
    ax.set(title="accuracy against sparsity", xlabel="sparsity level (fraction of weights pruned)",
           ylabel="final val/acc")
    ax.grid(alpha=0.3)
    fig.legend(handles=handles, loc="outside right upper", frameon=False)
    fig.savefig(path, dpi=DPI)


def _plot_mean_by_level(ax, runs: list, color, marker: str) -> None:
    # Repeated runs (seeds) at one level show as faint points around the mean the line goes through.
    by_level = defaultdict(list)
    for run in runs:
        by_level[run.level].append(run.val_acc)
    levels = sorted(by_level)
    ax.scatter([run.level for run in runs], [run.val_acc for run in runs], color=color, marker=marker, alpha=0.35)
    ax.plot(levels, [fmean(by_level[level]) for level in levels], color=color, marker=marker, markersize=7)


def _method_rank(method: str) -> tuple:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


# ---------------------------------------------------------------- markdown


def runs_table(runs: list) -> list:
    def cell(value, fmt="{}"):
        return "-" if value is None else fmt.format(value)

    lines = ["| run | recipe | method | level | block size | val/acc | steps | images/s |", "|" + "---|" * 8]
    for run in runs:
        s = run.summary
        lines.append(f"| {run.label} | {cell(s.get('recipe'))} | {run.method} | {cell(run.level, '{:g}')} "
                     f"| {cell(run.block_size)} | {cell(run.val_acc, '{:.4f}')} | {cell(s.get('global_step'))} "
                     f"| {cell(s.get('images_per_second'), '{:,.0f}')} |")
    return lines


def figure_block(heading: str, draw: Callable[[Path], None], path: Path, out_dir: Path) -> list:
    """The markdown for one plot: the embedded PNG, or why it was not drawn."""
    try:
        draw(path)
    except NothingToPlot as why:
        return [heading, "", f"_Not drawn: {why}._", ""]
    return [heading, "", f"![{path.stem}]({path.relative_to(out_dir).as_posix()})", ""]


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "run"


def write_report(runs: list, out_dir: Path) -> Path:
    figures = out_dir / FIGURES
    figures.mkdir(parents=True, exist_ok=True)
    # The folder is the report's own: plots left from an earlier report on other runs would look current.
    for stale in figures.glob("*.png"):
        stale.unlink()
    lines = ["# sparsetrain report", "",
             f"{len(runs)} run{'s' if len(runs) > 1 else ''}, from each run's {SUMMARY}, {CONFIG} and "
             f"{METRICS.as_posix()}. Level: fraction of weights pruned (2:4 = 0.5, dense = 0).", "",
             "## Runs", "", *runs_table(runs), ""]
    if len(runs) > 1:
        lines += figure_block("## Accuracy against sparsity", lambda p: plot_accuracy_vs_sparsity(runs, p),
                              figures / "accuracy_vs_sparsity.png", out_dir)
    lines += figure_block("## Loss and accuracy", lambda p: plot_curves(runs, p), figures / "curves.png", out_dir)
    lines += figure_block("## Mask flip rate", lambda p: plot_flip_rate(runs, p), figures / "flip_rate.png", out_dir)
    lines += ["## Per-layer measured sparsity", ""]
    for index, run in enumerate(runs):
        lines += figure_block(f"### {run.label}", lambda p, run=run: plot_layer_sparsity(run, p),
                              figures / f"layers_{index:02d}_{slug(run.label)}.png", out_dir)
    report = out_dir / "report.md"
    report.write_text("\n".join(lines))
    return report


def build_report(paths, out_dir: Optional[Path] = None) -> Path:
    """report.md for the given run directories and sweep roots; returns its path."""
    run_dirs = find_run_dirs(paths)
    runs = load_runs(run_dirs)
    if out_dir is None:
        out_dir = run_dirs[0] if len(run_dirs) == 1 else common_parent(run_dirs) / "report"
    return write_report(runs, Path(out_dir))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="sparsetrain-report",
        description="Write report.md and PNG plots from saved runs (summary.json, config.yaml, csv/metrics.csv).")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help=RUN_DIR_HINT)
    parser.add_argument("--out", type=Path, default=None,
                        help="where report.md and figures/ go (default: the run directory for one run, "
                             "<common parent>/report for several)")
    args = parser.parse_args(argv)
    try:
        report = build_report(args.run_dirs, args.out)
    except ReportError as e:
        parser.error(str(e))
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
