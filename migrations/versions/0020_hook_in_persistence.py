"""The hook in persistence: `persistence_run`, `persistence` and `neuron_emergence` carry the hook of the sets they
were computed from, and it joins their keys, so persistence of `mlp.pre` sets neither replaces nor is mistaken
for persistence of `mlp.post` sets of the same model.

- `v_persistence` shows the hook; `v_neuron_history` joins a neuron's emergence step on its own hook (it joined
  on model, dataset, control and threshold only, so an `mlp.pre` neuron's history showed the emergence step of
  the `mlp.post` neuron with the same index).
- Rows recorded before were all computed from `mlp.post` sets (the only hook persistence read), hence the
  backfill.

Revision ID: 0020
Revises: 0019
"""

import importlib

import sqlalchemy as sa
from alembic import op

revision = "0020"
down_revision = "0019"
branch_labels = None
depends_on = None

BASE = importlib.import_module("actdb.migrations.versions.0005_one_universal_rule_and_run_lifecycle")
TRUTH = importlib.import_module("actdb.migrations.versions.0014_truth_ablation_split_draws_self_corr")

OLD_VIEWS = {
    "v_neuron_history": TRUTH.VIEWS["v_neuron_history"],
    "v_persistence": TRUTH.VIEWS["v_persistence"],
}

VIEWS = {
    "v_neuron_history": """
        SELECT v.model, v.dataset, v.hook, v.control, v.threshold, v.step, v.layer, v.neuron, v.run_id,
               v.excess_corr, v.stability, v.mean_max_corr, v.mean_baseline, v.is_universal, v.is_dead,
               e.emergence_step
        FROM v_universality v
        JOIN model m ON m.name = v.model
        JOIN dataset d ON d.name = v.dataset
        LEFT JOIN neuron_emergence e ON e.model_id = m.id AND e.dataset_id = d.id AND e.hook = v.hook
             AND e.control = v.control AND e.threshold = v.threshold AND e.layer = v.layer AND e.neuron = v.neuron
    """,
    "v_persistence": """
        SELECT m.name AS model, d.name AS dataset, p.hook, p.control, p.threshold, p.from_step, p.to_step, p.layer,
               p.n_universal_from, p.n_universal_to, p.n_kept, p.p_persist, p.jaccard, p.mean_self_corr,
               p.mean_self_corr_universal, p.from_run_id, p.to_run_id, p.self_run_id
        FROM persistence p
        JOIN model m ON m.id = p.model_id
        JOIN dataset d ON d.id = p.dataset_id
    """,
}

PERSISTENCE_KEY = ["model_id", "dataset_id", "control", "threshold", "from_step", "to_step", "layer"]
EMERGENCE_KEY = ["model_id", "dataset_id", "control", "threshold", "layer", "neuron"]


def _hook_column() -> sa.Column:
    return sa.Column("hook", sa.String(length=50), nullable=False, server_default="mlp.post")


def upgrade() -> None:
    BASE._drop_views(OLD_VIEWS)
    with op.batch_alter_table("persistence_run") as b:
        b.add_column(_hook_column())
    with op.batch_alter_table("persistence") as b:
        b.add_column(_hook_column())
        b.drop_constraint("uq_persistence_key", type_="unique")
        b.create_unique_constraint("uq_persistence_key", ["hook", *PERSISTENCE_KEY])
    with op.batch_alter_table("neuron_emergence") as b:
        b.add_column(_hook_column())
        b.drop_constraint("pk_neuron_emergence", type_="primary")
        b.create_primary_key("pk_neuron_emergence", ["model_id", "dataset_id", "hook", *EMERGENCE_KEY[2:]])
    for table in ("persistence_run", "persistence", "neuron_emergence"):
        with op.batch_alter_table(table) as b:
            b.alter_column("hook", server_default=None)
    BASE._create_views(VIEWS)


def downgrade() -> None:
    BASE._drop_views(VIEWS)
    conn = op.get_bind()
    # the old keys cannot hold two hooks' rows: keep the mlp.post ones, which are what the old code computed
    for table in ("persistence", "neuron_emergence", "persistence_run"):
        conn.execute(sa.text(f"DELETE FROM {table} WHERE hook <> 'mlp.post'"))
    with op.batch_alter_table("neuron_emergence") as b:
        b.drop_constraint("pk_neuron_emergence", type_="primary")
        b.create_primary_key("pk_neuron_emergence", EMERGENCE_KEY)
        b.drop_column("hook")
    with op.batch_alter_table("persistence") as b:
        b.drop_constraint("uq_persistence_key", type_="unique")
        b.create_unique_constraint("uq_persistence_key", PERSISTENCE_KEY)
        b.drop_column("hook")
    with op.batch_alter_table("persistence_run") as b:
        b.drop_column("hook")
    BASE._create_views(OLD_VIEWS)
