"""Interventional robustness across seeds (`actdb robustness run`): runs, per-step results, controls.

- `robustness_run`: one request (seeds, steps, the intervention: an ablation rule, a generator or an edits file,
  the contexts, controls, seed, top-K), with the run lifecycle columns.
- `robustness_result`: per step, IR(x), IR(x'), IR_norm with its bootstrap CI over contexts, the controls' mean
  and sd, excess, permutation p and its floor, per-seed KL / loss change / top-1 flips summarised across seeds
  (mean, between-seed sd, sign agreement, Fleiss' kappa, ICC over the intervention and its controls).
- `robustness_control`: each control intervention's IR_norm and mean KL at each step.
- Views `v_robustness_by_step` and `v_robustness_controls` show complete runs only, naming the dataset.

Revision ID: 0017
Revises: 0016
"""

import importlib

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None

BASE = importlib.import_module("actdb.migrations.versions.0005_one_universal_rule_and_run_lifecycle")

VIEWS = {
    "v_robustness_by_step": """
        SELECT x.run_id, r.intervention, r.spec, r.method, r.models, d.name AS dataset, x.step, r.n_seeds,
               x.n_contexts, x.n_targets, x.n_neurons, x.ir_clean, x.ir_intervened, x.ir_norm, x.ir_norm_ci_low,
               x.ir_norm_ci_high, x.n_controls, x.control_mean, x.control_sd, x.excess, x.p_value, x.p_floor,
               x.kl_mean, x.kl_sd, x.loss_change_mean, x.loss_change_sd, x.flip_rate_mean, x.flip_rate_sd,
               x.sign_agreement, x.fleiss_kappa, x.icc, x.per_seed, r.topk, r.seed
        FROM robustness_result x
        JOIN robustness_run r ON r.id = x.run_id
        JOIN dataset d ON d.id = r.dataset_id
        WHERE r.status = 'complete'
    """,
    "v_robustness_controls": """
        SELECT c.run_id, r.intervention, r.spec, d.name AS dataset, c.step, c.control, c.ir_norm, c.kl_mean
        FROM robustness_control c
        JOIN robustness_run r ON r.id = c.run_id
        JOIN dataset d ON d.id = r.dataset_id
        WHERE r.status = 'complete'
    """,
}


def _run_columns() -> list[sa.Column]:
    return [
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=True),
        sa.Column("pid", sa.Integer(), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(), nullable=True),
        sa.Column("started_at", sa.DateTime(), nullable=True),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.Column("seconds", sa.Float(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
    ]


def _run_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["run_id"], ["robustness_run.id"], name=op.f(f"fk_{table}_run_id_robustness_run"), ondelete="CASCADE"
    )


def upgrade() -> None:
    op.create_table(
        "robustness_run",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("request_key", sa.String(length=64), nullable=False),
        sa.Column("intervention", sa.String(length=20), nullable=False),
        sa.Column("spec", sa.Text(), nullable=False),
        sa.Column("method", sa.String(length=10), nullable=True),
        sa.Column("models", sa.Text(), nullable=False),
        sa.Column("steps", sa.Text(), nullable=False),
        sa.Column("n_seeds", sa.Integer(), nullable=False),
        sa.Column("dataset_id", sa.Integer(), nullable=False),
        sa.Column("eval_dataset_id", sa.Integer(), nullable=True),
        sa.Column("n_contexts", sa.Integer(), nullable=False),
        sa.Column("n_controls", sa.Integer(), nullable=False),
        sa.Column("seed", sa.Integer(), nullable=False),
        sa.Column("topk", sa.Integer(), nullable=True),
        sa.Column("forward_passes", sa.BigInteger(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        *_run_columns(),
        sa.ForeignKeyConstraint(
            ["dataset_id"], ["dataset.id"], name=op.f("fk_robustness_run_dataset_id_dataset"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["eval_dataset_id"],
            ["dataset.id"],
            name=op.f("fk_robustness_run_eval_dataset_id_dataset"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_robustness_run")),
    )
    op.create_index(op.f("ix_robustness_run_request_key"), "robustness_run", ["request_key"], unique=False)
    where = sa.text("status = 'running'")
    op.create_index(
        "uq_robustness_run_running_request",
        "robustness_run",
        ["request_key"],
        unique=True,
        sqlite_where=where,
        postgresql_where=where,
    )
    op.create_table(
        "robustness_result",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("step", sa.BigInteger(), nullable=False),
        sa.Column("n_contexts", sa.Integer(), nullable=False),
        sa.Column("n_targets", sa.BigInteger(), nullable=False),
        sa.Column("n_neurons", sa.Text(), nullable=True),
        sa.Column("ir_clean", sa.Float(), nullable=True),
        sa.Column("ir_intervened", sa.Float(), nullable=True),
        sa.Column("ir_norm", sa.Float(), nullable=True),
        sa.Column("ir_norm_ci_low", sa.Float(), nullable=True),
        sa.Column("ir_norm_ci_high", sa.Float(), nullable=True),
        sa.Column("n_controls", sa.Integer(), nullable=False),
        sa.Column("control_mean", sa.Float(), nullable=True),
        sa.Column("control_sd", sa.Float(), nullable=True),
        sa.Column("excess", sa.Float(), nullable=True),
        sa.Column("p_value", sa.Float(), nullable=True),
        sa.Column("p_floor", sa.Float(), nullable=True),
        sa.Column("kl_mean", sa.Float(), nullable=True),
        sa.Column("kl_sd", sa.Float(), nullable=True),
        sa.Column("loss_change_mean", sa.Float(), nullable=True),
        sa.Column("loss_change_sd", sa.Float(), nullable=True),
        sa.Column("flip_rate_mean", sa.Float(), nullable=True),
        sa.Column("flip_rate_sd", sa.Float(), nullable=True),
        sa.Column("sign_agreement", sa.Float(), nullable=True),
        sa.Column("fleiss_kappa", sa.Float(), nullable=True),
        sa.Column("icc", sa.Float(), nullable=True),
        sa.Column("per_seed", sa.Text(), nullable=True),
        _run_fk("robustness_result"),
        sa.PrimaryKeyConstraint("run_id", "step", name=op.f("pk_robustness_result")),
    )
    op.create_table(
        "robustness_control",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("step", sa.BigInteger(), nullable=False),
        sa.Column("control", sa.Integer(), nullable=False),
        sa.Column("ir_norm", sa.Float(), nullable=True),
        sa.Column("kl_mean", sa.Float(), nullable=True),
        _run_fk("robustness_control"),
        sa.PrimaryKeyConstraint("run_id", "step", "control", name=op.f("pk_robustness_control")),
    )
    BASE._create_views(VIEWS)


def downgrade() -> None:
    BASE._drop_views(VIEWS)
    op.drop_table("robustness_control")
    op.drop_table("robustness_result")
    op.drop_index("uq_robustness_run_running_request", table_name="robustness_run")
    op.drop_index(op.f("ix_robustness_run_request_key"), table_name="robustness_run")
    op.drop_table("robustness_run")
