"""`lcp report`: a table's results, verdicts and charts (report), a run's health from its
per-epoch records (health), every chart of the pipeline (plots)."""
