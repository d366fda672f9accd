"""What the pipeline runs: experiments.yaml's rows read and checked (manifest, schema) and which
runs a command means, by row, seed and config (selection)."""
