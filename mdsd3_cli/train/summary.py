"""What a training run reports before and after: the plan (`mdsd3 check`) and the summary of one process."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from mdsd3_cli.recipe.train import TrainRecipe
from mdsd3_cli.train.data import PairedDataset
from mdsd3_cli.util.runtime import exit_code_for


@dataclass
class TrainSummary:
    """What one `mdsd3 train` process did."""

    out_dir: Path
    total_steps: int
    start_step: int = 0
    end_step: int = 0
    first_loss: float | None = None
    last_loss: float | None = None
    elapsed_s: float = 0.0
    stopped_by: str | None = None
    skipped: dict[str, int] = field(default_factory=dict)
    checkpoint: Path | None = None
    adapter_dir: Path | None = None
    previews: int = 0

    @property
    def steps_done(self) -> int:
        return self.end_step - self.start_step

    @property
    def steps_per_s(self) -> float:
        return self.steps_done / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def exit_code(self) -> int:
        return exit_code_for(self.stopped_by) if self.stopped_by else 0

    def table(self) -> Table:
        table = Table(title="mdsd3 train", show_header=False)
        fmt = lambda value: "-" if value is None else f"{value:.4f}"  # noqa: E731
        rows = [
            (
                "steps",
                f"{self.end_step}/{self.total_steps}" + (f" (resumed at {self.start_step})" if self.start_step else ""),
            ),
            ("loss first / last", f"{fmt(self.first_loss)} / {fmt(self.last_loss)}"),
            ("steps/s (this process)", f"{self.steps_per_s:.2f}"),
            ("elapsed", f"{self.elapsed_s:.1f} s"),
            ("pairs skipped", ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())) or "none"),
            ("last checkpoint", escape(str(self.checkpoint or "-"))),
            ("adapter", escape(str(self.adapter_dir or "- (not finished)"))),
        ]
        if self.stopped_by:
            rows.append(("stopped by", f"{self.stopped_by} (rerun with --resume latest to continue)"))
        for name, value in rows:
            table.add_row(name, value)
        return table


def describe_training(recipe: TrainRecipe, dataset: PairedDataset) -> Table:
    """What a training run would do, for `mdsd3 check`: classes, pairs per dataset, schedule, output."""
    train = recipe.train
    table = Table(title="training plan", show_header=False)
    rows = [
        ("classes", ", ".join(recipe.classes)),
        ("base", recipe.model.base),
        ("adapter", str(recipe.model.adapter or "fresh (untrained)")),
        ("pairs", f"{len(dataset.pairs)}\n{dataset.summary()}"),
        ("steps", f"{train.steps} x batch {train.batch_size} x accumulation {train.grad_accum}"),
        ("start", f"z_T = alpha·noise + beta·clean latent: {train.start.describe()}"),
        ("output", str(recipe.output.dir)),
    ]
    for name, value in rows:
        table.add_row(name, escape(value))
    return table
