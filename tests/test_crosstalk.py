"""scripts/crosstalk.py in its quick mode: every class estimator against the classical degradations of every
other class (the presets' rain, haze with depth, Poisson-Gaussian noise, low light; a Gaussian blur; exposure
alone) on scikit-image photos. Each degradation moves any other class's estimator by at most 0.2 of its own."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from mdsd3_cli.evaluate import CLASS_ESTIMATORS

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "crosstalk.py"
MAX_CROSSTALK = 0.2


def test_every_estimator_moves_at_most_a_fifth_of_the_degraded_class_under_other_classes(capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("crosstalk_script", SCRIPT)  # in process: torch is loaded
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    module.main(["--quick", "--json"])
    report = json.loads(capsys.readouterr().out)
    matrix, worst = report["matrix"], report["worst_off_diagonal"]
    assert set(worst) >= {"rain", "haze", "noise", "low_light", "blur"}
    for label, row in matrix.items():
        own = worst[label]["own"]
        assert row[own] > 0.5, (label, row)  # the degradation is clearly visible to its own estimator
        for estimator in CLASS_ESTIMATORS:
            if estimator != own:
                assert row[estimator] <= MAX_CROSSTALK * row[own], (label, estimator, row)
