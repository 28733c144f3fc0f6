"""Batch pruning as a library, one module per job: which models to prune and how (``inputs``), one
model's rows, the work of one Ray task in ``pipelines/prune_batch.py`` (``task``), what a run reuses
(``plan``), the results store (``results``), the measured speed-ups (``latency``) and what a run
shows (``report``).

A row is one model, method and target (or accuracy floor). Every row records what produced it:
content hashes of the model file (or zoo member file) and of the metanetwork file, and the
settings that change its result (``RESULT_SETTINGS``); ``plan`` reuses a finished row only when
all of them match, and says why it recomputes one otherwise.
"""

from __future__ import annotations

from zoo.batch.inputs import (ACCURACY_DRIFT, BatchInputError, DEFAULT_TARGETS, PRECISION, RECONSTRUCT_HELP,  # noqa: F401
                              RUN_KEYS, Source, arch_file, canonical, canonical_values, check_choices,
                              check_allocator, check_classes, check_finite, check_input, check_metanet_level,
                              check_runs_and_methods, check_spec, drift_warning, family_of, file_digest, settle_allocator,
                              settle_metanet, stage_metanetworks,
                              find_sources, finetune_defaults, given, is_weight_level, load_data, load_source,
                              member_files, preparation_target, run_label, runs_of)
from zoo.batch.latency import LATENCY_COLUMNS, LATENCY_DEFAULTS, LATENCY_HELP, LATENCY_LIMITS, measure_rows  # noqa: F401
from zoo.batch.task import (PENDING, file_sizes, prune_model, publish)  # noqa: F401
from zoo.batch.plan import (Plan, RECONSTRUCT_SETTINGS, RESULT_SETTINGS, WEIGHT_SETTINGS, method_settings,  # noqa: F401
                            plan, row_key, settings_digest, why_recompute)
from zoo.batch.results import (COLUMNS, DIAGNOSTICS, KEY, RECONSTRUCT_COLUMNS, WEIGHT_COLUMNS, read_results,  # noqa: F401
                               write_results)
from zoo.batch.report import (mlflow_metrics, paired_summary, plot, plot_curves, plot_sparsity,  # noqa: F401
                              post_training_note, seen_note, summary_table, write_plots, write_summary)
