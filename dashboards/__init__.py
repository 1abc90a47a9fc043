"""Run comparison over MLflow (`splitmatch compare`); importable as `splitmatch.dashboards`."""
