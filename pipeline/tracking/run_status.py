"""How an MLflow run of `lcp` ends: the one place that writes a run's terminal status.

Who ends a run:

- the process that executes it, as it ends (`end_run`): a worker its run (FINISHED, or FAILED or
  KILLED with the reason), `lcp tune` its study's parent run, `lcp report` its report run;
- the side that schedules it, only for a run still open when it should not be (`end_if_open`):
  its worker never started, died without ending it, or was stopped; the run was superseded or
  orphaned; a trial's process is gone. A run that ended meanwhile keeps its own end, so the two
  sides never overwrite each other.

Every other module reads a run's status; none writes a terminal one (tests/test_import_graph.py).
"""

from __future__ import annotations

from typing import Any, Mapping

OPEN_STATUSES = ("RUNNING", "SCHEDULED")
REASON_TAGS = ("failure_reason", "killed_reason")


def end_run(tracker, run_id: str, status: str, tags: Mapping[str, Any] | None = None, *,
            clear_reasons: bool = False) -> None:
    """End run `run_id` with `status`, after setting `tags`; `clear_reasons` drops the reasons
    an earlier attempt left (a run that FINISHED on a later attempt did not fail)."""
    if tags:
        tracker.set_tags(run_id, tags)
    if clear_reasons:
        tracker.delete_tags(run_id, REASON_TAGS)
    tracker.set_terminated(run_id, status)


def end_if_open(tracker, run_id: str, status: str, tags: Mapping[str, Any]) -> bool:
    """End run `run_id` with `status` and `tags` if it is still RUNNING or SCHEDULED (a run that
    ended meanwhile keeps its own end); whether it did."""
    if tracker.get_run(run_id).info.status not in OPEN_STATUSES:
        return False
    end_run(tracker, run_id, status, tags)
    return True
