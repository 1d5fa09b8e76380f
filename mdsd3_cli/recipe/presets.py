"""What the shipped `mini` preset samples with and was trained for: the settings `mdsd3 init --preset mini` writes
(configs/demo.yaml's, `Synthesizer.from_preset("mini")`'s) and `check`'s warnings for settings outside them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mdsd3_cli.model.adapter import read_adapter_config
from mdsd3_cli.model.presets import is_preset

if TYPE_CHECKING:
    from mdsd3_cli.recipe.generate import Recipe

MINI = "mini"
MINI_SETTINGS: dict[str, Any] = {
    "model": {"base": MINI, "adapter": MINI},
    "input": {"size": 128},
    "sampling": {
        "steps": 4,
        "guidance": 1.0,
        "alpha": 0.3,
        "beta": 1.0,
        "grid_shifts": 2,
        "class_guidance": {"rain": 1.35},
    },
}
"""mini's model, size and sampling settings (configs/demo.yaml's); α and β are also its adapter config's `start`."""


@dataclass(frozen=True)
class TrainedFor:
    """The sampling settings a preset was trained and measured at: outside them, `check` warns."""

    steps: tuple[int, int]
    guidance: tuple[float, float]
    class_guidance: dict[str, tuple[float, float]]
    """Per class, the sampling.class_guidance range measured (absent class: 1 only)."""
    note: str


TRAINED_FOR: dict[str, TrainedFor] = {
    MINI: TrainedFor(
        steps=(4, 4),
        guidance=(0.0, 1.0),
        class_guidance={"rain": (1.0, 2.5)},
        note="mini was trained to sample in 4 steps from its start, conditionally (guidance <= 1: "
        "no unconditional pass), and measured only there (docs/mini.md)",
    ),
}
"""Steps and guidance per preset. The sizes come from the adapter config's training record (its `crop`,
`final_crop` and `phases`), which the training script writes with the weights."""


def trained_sizes(adapter_training: dict[str, Any]) -> tuple[int, int] | None:
    """(smallest, largest) crop side the adapter was trained on, from its config's `training` record; None when it
    records none."""
    sides = [adapter_training[key] for key in ("crop", "final_crop") if isinstance(adapter_training.get(key), int)]
    phases = adapter_training.get("phases")
    if isinstance(phases, list):  # [[crop, batch, steps], ...]
        sides += [phase[0] for phase in phases if isinstance(phase, list) and phase and isinstance(phase[0], int)]
    return (min(sides), max(sides)) if sides else None


def _outside(value: float, bounds: tuple[float, float]) -> bool:
    return not bounds[0] <= value <= bounds[1]


def _span(bounds: tuple[float, float]) -> str:
    return f"{bounds[0]:g}" if bounds[0] == bounds[1] else f"{bounds[0]:g}-{bounds[1]:g}"


def trained_range_warnings(recipe: Recipe) -> list[str]:
    """One warning per sampling.steps, sampling.guidance and input size outside what the recipe's preset adapter
    (`model.adapter: mini`) was trained for; none for other adapters."""
    name = recipe.model.adapter
    if not is_preset(name) or name not in TRAINED_FOR:
        return []
    trained = TRAINED_FOR[name]
    adapter = f"model.adapter {name}"
    warnings = []
    steps, guidance = recipe.sampling.steps, recipe.sampling.guidance
    if _outside(steps, trained.steps):
        warnings.append(
            f"sampling.steps {steps}: {adapter} was trained for {_span(trained.steps)} steps "
            f"({trained.note}); set sampling.steps: {MINI_SETTINGS['sampling']['steps']}"
        )
    if _outside(guidance, trained.guidance):
        warnings.append(
            f"sampling.guidance {guidance:g}: {adapter} was trained for guidance {_span(trained.guidance)} "
            f"({trained.note}); higher guidance overshoots haze and low light and adds mosaic; set "
            f"sampling.guidance: {MINI_SETTINGS['sampling']['guidance']:g}"
        )
    for name, value in recipe.sampling.class_guidance.items():
        measured = trained.class_guidance.get(name, (1.0, 1.0))
        if _outside(value, measured):
            warnings.append(
                f"sampling.class_guidance.{name} {value:g}: {adapter} was measured with {name} guidance "
                f"{_span(measured)} (docs/mini.md); outside it the class overshoots and adds mosaic"
            )
    sizes = trained_sizes(read_adapter_config(recipe.adapter_dir()).training)
    native = recipe.input.resize == "native"
    field, side = recipe.input.largest_side()
    if sizes is not None and (side > sizes[1] if native else _outside(side, sizes)):
        warnings.append(
            f"{field} {side}: {adapter} was trained on {_span(sizes)}-pixel crops (its "
            f"adapter_config.json's training record); other sizes are outside its training "
            f"distribution; set {field}: {MINI_SETTINGS['input']['size']}"
        )
    return warnings


_MINI_RECIPE = """\
# mdsd3 recipe for the built-in `mini` model (shipped in the package: CPU, no downloads), at the settings it
# was trained for (configs/demo.yaml's). Relative paths are taken against the folder of this file.
#   mdsd3 check --config {path}      # warns when steps, guidance or size leave what mini was trained for
#   mdsd3 generate --config {path}
# mini is a demonstration trained on synthetic degradations, not a substitute for SD3 with an adapter trained
# on real pairs (docs/mini.md says what it reaches).

model:
  base: {base}                    # a small MMDiT on a lossless pixel codec ...
  adapter: {adapter}                 # ... and its trained adapter: classes rain, haze, noise, low_light

input:
  paths: [photos/]              # folders, globs ("photos/*.jpg") or .txt lists
  size: {size}                     # mini's training size (check warns outside its training crops)
  resize: center_crop

output:
  dir: out/mini                 # gets clean/, degraded/<variant>/, manifest/, errors/, run.json
  format: png

sampling:
  steps: {steps}                      # mini was fine-tuned to sample in 4 steps ...
  guidance: {guidance}                 # ... conditionally: no unconditional pass (higher overshoots)
  alpha: {alpha}                    # start from {alpha}·noise + {beta}·photo, the start mini was trained for
  beta: {beta}
  seed: 1234
  batch_size: 4
  grid_shifts: {grid_shifts}                # average each step over two token grids: less mosaic, twice the work
  class_guidance: {{rain: {rain_guidance}}}   # mini's rain is faint: scale its own contribution (one more pass per rain sample)

variants:                       # each writes degraded/<name>/
  - {{name: identity, classes: {{}}}}                      # the photo as mini reproduces it (evaluate's baseline)
  - {{name: rain, classes: {{rain: 1.0}}}}
  - {{name: haze, classes: {{haze: 1.0}}}}
  - {{name: light_haze, classes: {{haze: 0.4}}}}
  - {{name: noise, classes: {{noise: 1.0}}}}
  - {{name: low_light, classes: {{low_light: 1.0}}}}
  - {{name: rain_haze, classes: {{rain: 1.0, haze: 1.0}}}}   # never seen together in training
"""


def preset_recipe_text(name: str, path: str = "recipe.yaml") -> str:
    """A commented recipe that runs preset `name` as the demo does (`mdsd3 init --preset`); ValueError for a name
    that is not a trained preset."""
    if name != MINI:
        raise ValueError(f"unknown preset {name!r}; presets with a recipe: {MINI}")
    sampling = {name: value for name, value in MINI_SETTINGS["sampling"].items() if name != "class_guidance"}
    return _MINI_RECIPE.format(
        path=path,
        rain_guidance=MINI_SETTINGS["sampling"]["class_guidance"]["rain"],
        **MINI_SETTINGS["model"],
        **MINI_SETTINGS["input"],
        **sampling,
    )
