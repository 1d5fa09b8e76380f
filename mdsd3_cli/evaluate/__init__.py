"""`mdsd3 evaluate`: measure the degradations a dataset actually contains (classical estimators, no weights).

from mdsd3_cli.evaluate import evaluate_dataset, measure_pair
report = evaluate_dataset(Path("out/demo"))
report.variant("rain")["normalised"]["rain"]
"""

from .estimators import ESTIMATOR_VERSIONS
from .measures import CLASS_ESTIMATORS, CLASS_SCALES, CLASS_UNITS, measure_pair, normalised_strengths
from .pairs import EvaluateError, Problem
from .report import Report, write_report
from .run import evaluate_dataset

__all__ = [
    "CLASS_ESTIMATORS",
    "CLASS_SCALES",
    "CLASS_UNITS",
    "ESTIMATOR_VERSIONS",
    "EvaluateError",
    "Problem",
    "Report",
    "evaluate_dataset",
    "measure_pair",
    "normalised_strengths",
    "write_report",
]
