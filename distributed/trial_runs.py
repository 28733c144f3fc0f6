"""One MLflow run per Ray Tune trial, kept across restarts of the search.

Ray's own ``MLflowLoggerCallback`` (``ray.air``) keeps the trial -> run mapping in memory: a
search resumed with ``Tuner.restore`` gives every trial it resumes a second run. Here the run
carries the trial's id as a tag and a resumed trial logs into the run it started.
"""

from __future__ import annotations

import math
import time

import mlflow
from mlflow.entities import Metric, Param, RunStatus
from ray.tune import Callback

from distributed.tracking import flatten, use_experiment

TRIAL_TAG = "trial_id"


class MLflowTrialRuns(Callback):
    """Params: the trial's configuration, once; metrics: every numeric value of each result the
    trial reports, at its ``training_iteration``; status: FINISHED or FAILED when the trial ends."""

    def __init__(self, experiment: str, out_dir: str, tags: dict | None = None):
        self.experiment, self.out_dir, self.tags = experiment, out_dir, dict(tags or {})
        self._runs: dict[str, str] = {}

    def setup(self, **info) -> None:
        use_experiment(self.experiment, self.out_dir)
        self._client = mlflow.MlflowClient()
        self._experiment_id = mlflow.get_experiment_by_name(self.experiment).experiment_id

    def run_id(self, trial) -> str:
        """The trial's run: found by its id tag (a resumed trial), else created with its params."""
        if trial.trial_id not in self._runs:
            found = self._client.search_runs([self._experiment_id], f"tags.{TRIAL_TAG} = '{trial.trial_id}'",
                                             max_results=1)
            if found:
                run_id = found[0].info.run_id
            else:
                run = self._client.create_run(self._experiment_id, run_name=str(trial),
                                              tags={**self.tags, TRIAL_TAG: trial.trial_id})
                run_id = run.info.run_id
                params = [Param(k, str(v)[:5000]) for k, v in flatten(trial.config).items()]
                self._client.log_batch(run_id, params=params)
            self._runs[trial.trial_id] = run_id
        return self._runs[trial.trial_id]

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._client.update_run(self.run_id(trial), status=RunStatus.to_string(RunStatus.RUNNING))

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        step, now = int(result.get("training_iteration", 0)), int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in flatten(result).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                   and not k.startswith("config.")]  # the configuration is in the params
        self._client.log_batch(self.run_id(trial), metrics=metrics)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._client.set_terminated(self.run_id(trial), "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._client.set_terminated(self.run_id(trial), "FAILED")
