"""Jobs (command lines) run on slots, each in a process of its own: the scheduler, the executors
(this machine's CPUs or GPUs, or a Ray cluster) and how a run's OpenMP threads wait (openmp).
Nothing here knows MLflow or what the jobs run."""
