"""Concept-expert neurons (`actdb concept`): concept sets, runs, per-concept scores, top-k experts, alignment.

- `concept_set`: a named concepts file (canonical JSONL, fingerprint).
- `concept_run`: one checkpoint's activation set scored on a concept set (pool, hook, mask, k, tau, permutations,
  seed), with the run lifecycle columns and its AP sidecar path.
- `concept_score`, `concept_expert`, `concept_alignment`: per concept summaries, the top-k neurons by AP, RSA
  with references (the taxonomy always; human files when given).
- Views `v_concept_scores`, `v_concept_experts`, `v_concept_alignment` name the model, step and dataset, and show
  complete runs only.

Revision ID: 0016
Revises: 0014
"""

import importlib

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0014"
branch_labels = None
depends_on = None

BASE = importlib.import_module("actdb.migrations.versions.0005_one_universal_rule_and_run_lifecycle")
RUN_LABELS = """concept_run r ON r.id = {key}
        JOIN concept_set cs ON cs.id = r.concept_set_id
        JOIN activation_set s ON s.id = r.set_id
        JOIN checkpoint c ON c.id = s.checkpoint_id
        JOIN model m ON m.id = c.model_id
        JOIN dataset d ON d.id = s.dataset_id"""
RUN_COLUMNS = "cs.name AS concept_set, m.name AS model, c.step, d.name AS dataset, r.hook, r.pool, r.mask_concept_token"

VIEWS = {
    "v_concept_scores": f"""
        SELECT x.run_id, {RUN_COLUMNS}, r.k, r.tau, x.concept, x.n_positive, x.n_negative, x.best_ap, x.best_auroc,
               x.kth_ap, x.null_best_q99, x.null_kth_q99, x.excess_ap, x.p_best, r.n_permutations, x.n_above_tau,
               r.set_id
        FROM concept_score x
        JOIN {RUN_LABELS.format(key="x.run_id")}
        WHERE r.status = 'complete'
    """,
    "v_concept_experts": f"""
        SELECT e.run_id, {RUN_COLUMNS}, r.k, e.concept, e.rank, e.layer, e.neuron, e.ap, e.auroc, r.set_id
        FROM concept_expert e
        JOIN {RUN_LABELS.format(key="e.run_id")}
        WHERE r.status = 'complete'
    """,
    "v_concept_alignment": f"""
        SELECT a.run_id, {RUN_COLUMNS}, a.reference, a.rho, a.p, a.n_permutations, a.n_pairs, a.triplet_accuracy,
               a.n_triplets, r.set_id
        FROM concept_alignment a
        JOIN {RUN_LABELS.format(key="a.run_id")}
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
        ["run_id"], ["concept_run.id"], name=op.f(f"fk_{table}_run_id_concept_run"), ondelete="CASCADE"
    )


def upgrade() -> None:
    op.create_table(
        "concept_set",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("n_concepts", sa.Integer(), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_concept_set")),
        sa.UniqueConstraint("name", name=op.f("uq_concept_set_name")),
    )
    op.create_table(
        "concept_run",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("request_key", sa.String(length=64), nullable=False),
        sa.Column("concept_set_id", sa.Integer(), nullable=False),
        sa.Column("set_id", sa.Integer(), nullable=False),
        sa.Column("hook", sa.String(length=50), nullable=False),
        sa.Column("pool", sa.String(length=10), nullable=False),
        sa.Column("mask_concept_token", sa.Boolean(), nullable=False),
        sa.Column("k", sa.Integer(), nullable=False),
        sa.Column("tau", sa.Float(), nullable=False),
        sa.Column("n_permutations", sa.Integer(), nullable=False),
        sa.Column("seed", sa.Integer(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("n_sentences", sa.Integer(), nullable=True),
        sa.Column("n_neurons", sa.Integer(), nullable=True),
        sa.Column("n_empty", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        *_run_columns(),
        sa.ForeignKeyConstraint(
            ["concept_set_id"],
            ["concept_set.id"],
            name=op.f("fk_concept_run_concept_set_id_concept_set"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["set_id"], ["activation_set.id"], name=op.f("fk_concept_run_set_id_activation_set"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_concept_run")),
    )
    op.create_index(op.f("ix_concept_run_request_key"), "concept_run", ["request_key"], unique=False)
    where = sa.text("status = 'running'")
    op.create_index(
        "uq_concept_run_running_request",
        "concept_run",
        ["request_key"],
        unique=True,
        sqlite_where=where,
        postgresql_where=where,
    )
    op.create_table(
        "concept_score",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("concept", sa.String(length=200), nullable=False),
        sa.Column("n_positive", sa.Integer(), nullable=False),
        sa.Column("n_negative", sa.Integer(), nullable=False),
        sa.Column("best_ap", sa.Float(), nullable=False),
        sa.Column("best_auroc", sa.Float(), nullable=False),
        sa.Column("kth_ap", sa.Float(), nullable=False),
        sa.Column("null_best_q99", sa.Float(), nullable=True),
        sa.Column("null_kth_q99", sa.Float(), nullable=True),
        sa.Column("excess_ap", sa.Float(), nullable=True),
        sa.Column("p_best", sa.Float(), nullable=True),
        sa.Column("n_above_tau", sa.Integer(), nullable=False),
        _run_fk("concept_score"),
        sa.PrimaryKeyConstraint("run_id", "concept", name=op.f("pk_concept_score")),
    )
    op.create_table(
        "concept_expert",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("concept", sa.String(length=200), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("layer", sa.Integer(), nullable=False),
        sa.Column("neuron", sa.Integer(), nullable=False),
        sa.Column("ap", sa.Float(), nullable=False),
        sa.Column("auroc", sa.Float(), nullable=False),
        _run_fk("concept_expert"),
        sa.PrimaryKeyConstraint("run_id", "concept", "rank", name=op.f("pk_concept_expert")),
    )
    op.create_table(
        "concept_alignment",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("reference", sa.String(length=200), nullable=False),
        sa.Column("rho", sa.Float(), nullable=True),
        sa.Column("p", sa.Float(), nullable=True),
        sa.Column("n_permutations", sa.Integer(), nullable=False),
        sa.Column("n_pairs", sa.Integer(), nullable=False),
        sa.Column("triplet_accuracy", sa.Float(), nullable=True),
        sa.Column("n_triplets", sa.Integer(), nullable=True),
        _run_fk("concept_alignment"),
        sa.PrimaryKeyConstraint("run_id", "reference", name=op.f("pk_concept_alignment")),
    )
    BASE._create_views(VIEWS)


def downgrade() -> None:
    BASE._drop_views(VIEWS)
    op.drop_table("concept_alignment")
    op.drop_table("concept_expert")
    op.drop_table("concept_score")
    op.drop_index("uq_concept_run_running_request", table_name="concept_run")
    op.drop_index(op.f("ix_concept_run_request_key"), table_name="concept_run")
    op.drop_table("concept_run")
    op.drop_table("concept_set")
