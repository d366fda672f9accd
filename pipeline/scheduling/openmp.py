"""How a run's OpenMP threads wait for work: the default of every process that trains, the
pipeline's workers (`pipeline.scheduling.executors.Slot.env`, the Ray task) and `lcp train`
(cli.py, also behind `python3 run_classification.py`).

GNU OpenMP (PyTorch's on Linux) reads its variables once, when it starts, which is when torch is
first imported: a process applies the rule to itself before that (cli.py does, first thing), and
to its children through their environment. Standard library only, so that importing this module
never starts torch.
"""

from __future__ import annotations

import os

# GNU OpenMP (PyTorch's on Linux) spins this many rounds waiting for work, then sleeps
SHORT_SPIN = {"GOMP_SPINCOUNT": "10000"}
OPENMP_WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def openmp_waiting() -> dict[str, str]:
    """How a run's OpenMP threads wait, unless the user chose (OMP_WAIT_POLICY or
    GOMP_SPINCOUNT in this process's environment): a short spin, then sleep. Measured on 2 cores
    (benchmarks/shared_cpu.py, docs/speed.md, "Sharing the CPU"): as fast alone as OpenMP's long
    default spin, and beside two other runs 2.9x its time alone instead of 5.4x; PASSIVE (no
    spin) is 2.1x there but 1.33x slower alone."""
    return {} if any(v in os.environ for v in OPENMP_WAIT_VARIABLES) else dict(SHORT_SPIN)


def wait_as_the_workers_do() -> None:
    """This process's OpenMP threads wait as a worker's do (`openmp_waiting`); call it before
    torch is imported, or it changes nothing."""
    os.environ.update(openmp_waiting())
