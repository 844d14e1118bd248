"""A Hydra callback that writes one summary table for a multirun, from each job's summary.json."""
import json
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

COLUMNS = ("job", "recipe", "objective", "val/acc", "val/loss", "global_step", "images_per_second", "mean_sparsity")


def collect_summaries(sweep_dir: Path) -> list:
    rows = []
    for path in sorted(Path(sweep_dir).glob("*/summary.json")):
        s = json.loads(path.read_text())
        sparse = [layer["measured_sparsity"] for layer in s.get("layers", [])
                  if layer.get("pattern") not in (None, "dense") and layer.get("measured_sparsity") is not None]
        rows.append({
            "job": path.parent.name, "recipe": s.get("recipe"), "objective": s.get("objective"),
            "val/acc": s.get("metrics", {}).get("val/acc"), "val/loss": s.get("metrics", {}).get("val/loss"),
            "global_step": s.get("global_step"), "images_per_second": s.get("images_per_second"),
            "mean_sparsity": sum(sparse) / len(sparse) if sparse else 0.0,
        })
    return rows


def format_markdown(rows: list) -> str:
    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_sweep_summary(sweep_dir: Path) -> list:
    rows = collect_summaries(sweep_dir)
    Path(sweep_dir, "summary.json").write_text(json.dumps(rows, indent=1))
    Path(sweep_dir, "summary.md").write_text(format_markdown(rows))
    return rows


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = write_sweep_summary(sweep_dir)
        print(f"sweep summary ({len(rows)} jobs): {sweep_dir / 'summary.md'}")
