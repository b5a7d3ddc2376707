"""The study engine that the ablation and the search share: a study is an Optuna RDB storage used
as a work queue, one parent MLflow run, and workers on any number of machines.

It owns the lifecycle both entry points go through:

1. :func:`open_study`: the storage, the study's experiment, and creating or joining the study
   (with the entry run of ``mlflow run``, which the command took off the environment into its
   options so that no unit resumes it);
2. :meth:`Opened.setting_up` (creator only) and :meth:`Opened.ready`: the creator writes the
   parent run and its queue; joiners wait until it is complete, then the entry run is filed
   under the parent;
3. :func:`unit`: one claimed unit (a cell and seed, or a trial) trained under a heartbeat, its
   outcome recorded whatever happens; a dead worker's unit goes back to the queue;
4. :func:`finish_parent` and :func:`register`.

The caller drives each step, so the walk from an entry point to a trained run goes down the
modules and never back up through a callback. Optuna's private attributes (a study's storage, a
trial's id) are used in :mod:`.queue` and nowhere else.

One module a job: :mod:`.file` (the study or search file), :mod:`.command` (the options and
the main shape both entry points share), :mod:`.queue` (the storage as a work queue, units with
heartbeats, the failure policy), :mod:`.parent` (the parent run's life), :mod:`.progress` (the
estimate and the bar).
"""

from __future__ import annotations

from .command import (STORAGE_ENV, Deadline, StudyOptions, add_study_args, again, deadline, options,
                      parse_duration, resolve_profile, resumable, say_stopped, start, study_name,
                      worker_threads)
from .file import PROFILES, check_budget, read_study_file
from .parent import (Opened, attach_entry_run, check_parent_here, create_parent,
                     find_run, finish_parent, log_interval, open_or_join, open_study,
                     own_runs, register, run_id_of, study_experiments, study_runs,
                     take_over_parent, unit_runs)
from .progress import Eta, duration, study_bar
from .queue import (OUT_OF_MEMORY, UNIT_FAILURES, BugCount, Heartbeat, Result,
                    claim, fail_stale, hand_back, open_storage, settled, storage_of, trial_id,
                    unit, units_own, wait_for_others)

__all__ = [
    "STORAGE_ENV", "Deadline", "StudyOptions", "add_study_args", "again", "deadline", "parse_duration",
    "options", "resolve_profile", "say_stopped", "resumable",
    "start", "study_name", "worker_threads", "PROFILES", "check_budget", "read_study_file",
    "Opened", "attach_entry_run", "check_parent_here", "create_parent", "find_run",
    "finish_parent", "log_interval", "open_or_join", "open_study", "unit_runs", "run_id_of",
    "own_runs", "register", "study_experiments", "study_runs", "take_over_parent", "Eta", "duration", "study_bar", "OUT_OF_MEMORY",
    "UNIT_FAILURES", "BugCount", "Heartbeat", "Result", "claim", "fail_stale", "hand_back",
    "open_storage", "settled", "storage_of", "trial_id", "unit", "units_own", "wait_for_others",
]
