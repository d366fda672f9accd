"""MLflow: the store and the pipeline's thin layer over it (store), the one place a run's end is
written (run_status), the MLflow UI on the store (ui)."""
