"""`lcp tune`: an Optuna study (optuna_study), its trials as jobs of the pipeline's scheduler
(tune), and the worker's side of one trial (trial). docs/tuning.md."""
