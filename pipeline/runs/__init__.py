"""A table's runs: which pairs (row, seed) to run, skip or resume, claimed and waited for
(table); one pair's MLflow run and the scheduler hooks (table_run); one owner per pair
(ownership); a run's folder and the worker's command line (rundir); how long runs will take
(budget)."""
