"""Robustness views name where the contexts came from: `v_robustness_by_step` and `v_robustness_controls` gain
`eval_dataset` after `dataset`.

- `dataset` is the dataset of the seeds' activation sets, which selects the neurons (universal, families,
  frequency-matched controls); `robustness_run.eval_dataset_id` is the one whose sequences were measured (the same
  one unless `--eval-dataset` named another; none for `--edits`, whose contexts are the file's). The views showed
  only the first, so a run on held-out contexts read as in-sample.

Revision ID: 0021
Revises: 0020
"""

import importlib

revision = "0021"
down_revision = "0020"
branch_labels = None
depends_on = None

BASE = importlib.import_module("actdb.migrations.versions.0005_one_universal_rule_and_run_lifecycle")
ROBUSTNESS = importlib.import_module("actdb.migrations.versions.0017_robustness")

OLD_VIEWS = {
    "v_robustness_by_step": ROBUSTNESS.VIEWS["v_robustness_by_step"],
    "v_robustness_controls": ROBUSTNESS.VIEWS["v_robustness_controls"],
}

VIEWS = {
    "v_robustness_by_step": """
        SELECT x.run_id, r.intervention, r.spec, r.method, r.models, d.name AS dataset, e.name AS eval_dataset,
               x.step, r.n_seeds, x.n_contexts, x.n_targets, x.n_neurons, x.ir_clean, x.ir_intervened, x.ir_norm,
               x.ir_norm_ci_low, x.ir_norm_ci_high, x.n_controls, x.control_mean, x.control_sd, x.excess,
               x.p_value, x.p_floor, x.kl_mean, x.kl_sd, x.loss_change_mean, x.loss_change_sd, x.flip_rate_mean,
               x.flip_rate_sd, x.sign_agreement, x.fleiss_kappa, x.icc, x.per_seed, r.topk, r.seed
        FROM robustness_result x
        JOIN robustness_run r ON r.id = x.run_id
        JOIN dataset d ON d.id = r.dataset_id
        LEFT JOIN dataset e ON e.id = r.eval_dataset_id
        WHERE r.status = 'complete'
    """,
    "v_robustness_controls": """
        SELECT c.run_id, r.intervention, r.spec, d.name AS dataset, e.name AS eval_dataset, c.step, c.control,
               c.ir_norm, c.kl_mean
        FROM robustness_control c
        JOIN robustness_run r ON r.id = c.run_id
        JOIN dataset d ON d.id = r.dataset_id
        LEFT JOIN dataset e ON e.id = r.eval_dataset_id
        WHERE r.status = 'complete'
    """,
}


def upgrade() -> None:
    BASE._drop_views(OLD_VIEWS)
    BASE._create_views(VIEWS)


def downgrade() -> None:
    BASE._drop_views(VIEWS)
    BASE._create_views(OLD_VIEWS)
