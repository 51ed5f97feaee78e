"""What a neuron does: explanations per activation set and the neuron families of universal neurons.

- `set_explanation`: one row per set whose explanation file (max-activating examples, token and position
  variance fractions, vocabulary statistics) exists, with the parameters and the family thresholds it used.
- `neuron_explanation`: per neuron, the scalars an analyst filters on (token and position variance fractions,
  the top token by mean activation, the vocabulary moments of W_U^T w_out and the prediction/suppression label).
- `v_neuron_explanations` names them and gives every neuron one family by the thresholds recorded with its set
  (token, position, prediction, suppression, else unexplained; the first that holds); `v_neuron_families` lists
  the universal neurons of every complete run with their family.

Revision ID: 0010
Revises: 0009
"""

import importlib

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

BASE = importlib.import_module("actdb.migrations.versions.0005_one_universal_rule_and_run_lifecycle")
SET_LABELS = BASE.SET_LABELS

FAMILY = """CASE
            WHEN e.token_r2 >= x.token_min_r2 THEN 'token'
            WHEN e.position_r2 >= x.position_min_r2 THEN 'position'
            WHEN e.vocab_label = 'prediction' THEN 'prediction'
            WHEN e.vocab_label = 'suppression' THEN 'suppression'
            ELSE 'unexplained' END"""

VIEWS = {
    "v_neuron_explanations": f"""
        SELECT m.name AS model, c.step, d.name AS dataset, e.layer, e.neuron, e.max_activation, e.token_r2,
               e.position_r2, e.top_token, e.top_token_mean, e.top_token_count, e.vocab_mean, e.vocab_var,
               e.vocab_skew, e.vocab_kurtosis, e.vocab_label, {FAMILY} AS family, x.token_min_r2, x.position_min_r2,
               x.vocab_kurtosis_min, x.vocab_skew_min, e.set_id
        FROM neuron_explanation e
        JOIN set_explanation x ON x.set_id = e.set_id
        JOIN {SET_LABELS.format(key="e.set_id")}
    """,
    "v_neuron_families": """
        SELECT u.run_id, u.control, u.threshold, u.model, u.step, u.dataset, u.layer, u.neuron, u.excess_corr,
               u.stability, e.token_r2, e.position_r2, e.top_token, e.vocab_skew, e.vocab_kurtosis, e.vocab_label,
               e.family, u.set_id
        FROM v_universal_neurons u
        JOIN v_neuron_explanations e ON e.set_id = u.set_id AND e.layer = u.layer AND e.neuron = u.neuron
    """,
}


def upgrade() -> None:
    op.create_table(
        "set_explanation",
        sa.Column("set_id", sa.Integer(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("top_k", sa.Integer(), nullable=False),
        sa.Column("min_count", sa.Integer(), nullable=False),
        sa.Column("n_tokens", sa.BigInteger(), nullable=False),
        sa.Column("n_token_ids", sa.Integer(), nullable=False),
        sa.Column("n_positions", sa.Integer(), nullable=False),
        sa.Column("token_min_r2", sa.Float(), nullable=False),
        sa.Column("position_min_r2", sa.Float(), nullable=False),
        sa.Column("vocab_kurtosis_min", sa.Float(), nullable=True),
        sa.Column("vocab_skew_min", sa.Float(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["set_id"], ["activation_set.id"], name=op.f("fk_set_explanation_set_id_activation_set"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("set_id", name=op.f("pk_set_explanation")),
    )
    op.create_table(
        "neuron_explanation",
        sa.Column("set_id", sa.Integer(), nullable=False),
        sa.Column("layer", sa.Integer(), nullable=False),
        sa.Column("neuron", sa.Integer(), nullable=False),
        sa.Column("max_activation", sa.Float(), nullable=True),
        sa.Column("token_r2", sa.Float(), nullable=True),
        sa.Column("position_r2", sa.Float(), nullable=True),
        sa.Column("top_token", sa.Integer(), nullable=True),
        sa.Column("top_token_mean", sa.Float(), nullable=True),
        sa.Column("top_token_count", sa.Integer(), nullable=True),
        sa.Column("vocab_mean", sa.Float(), nullable=True),
        sa.Column("vocab_var", sa.Float(), nullable=True),
        sa.Column("vocab_skew", sa.Float(), nullable=True),
        sa.Column("vocab_kurtosis", sa.Float(), nullable=True),
        sa.Column("vocab_label", sa.String(length=20), nullable=True),
        sa.ForeignKeyConstraint(
            ["set_id"],
            ["activation_set.id"],
            name=op.f("fk_neuron_explanation_set_id_activation_set"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("set_id", "layer", "neuron", name=op.f("pk_neuron_explanation")),
    )
    BASE._create_views(VIEWS)


def downgrade() -> None:
    BASE._drop_views(VIEWS)
    op.drop_table("neuron_explanation")
    op.drop_table("set_explanation")
