"""The paper's experiment pipeline on the library (lcp/): the tables of experiments.yaml run,
tracked, tuned and reported. Its folders, one concern each, from the commands down:

    commands.py   the pipeline's `lcp` commands: list, run-table, run, report, ui, tune, budget
    worker.py     the process of one run (`python -m pipeline.worker`): a table's run or a trial
    tuning/       `lcp tune`: an Optuna study, its trials run as jobs, the worker's side of one
    reporting/    `lcp report`: results, verdicts, a run's health, every chart
    runs/         a table's runs: which to run, skip or resume, who owns them, their MLflow runs
                  and folders, how long they will take
    manifest/     experiments.yaml (its rows and schema) and which runs a command means
    tracking/     MLflow: the store, how a run ends, `lcp ui`
    scheduling/   jobs on slots (processes on this machine's CPUs or GPUs, or Ray tasks) and how
                  their OpenMP threads wait; knows neither MLflow nor what the jobs run

A folder imports only the folders below it in this list; a package's `__init__` imports nothing,
so that importing a module loads only what it needs (tests/test_import_graph.py checks both).
"""
