"""`mdsd3 calibrate`: fit a recipe's class ratios so the strengths it generates match a real paired set's
(docs/calibrate.md).

    from mdsd3_cli.calibrate import calibrate
    report = calibrate(Path("configs/demo.yaml"), Path("reference"), Path("calibrated.yaml"))
"""

from .report import CalibrationReport
from .run import EXIT_LEFT_AS_GIVEN, EXIT_OK, calibrate

__all__ = ["EXIT_LEFT_AS_GIVEN", "EXIT_OK", "CalibrationReport", "calibrate"]
