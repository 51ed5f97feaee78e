"""One meaning of "universal" and one run lifecycle.

- `universality.is_universal` is dropped: a neuron is universal when `excess_corr > threshold`, evaluated where
  it is read; `correlation_run.threshold` becomes the run's default for display, and the views apply it.
- `threshold` joins the keys of `persistence` and `neuron_emergence`, and is recorded on `ablation`.
- Every run table (activation_set, correlation_run, persistence_run, ablation) carries status, host, pid and
  heartbeat; a partial unique index allows one running row per request key.
- Correlation request keys no longer include the threshold (recomputed for existing runs).

Revision ID: 0005
Revises: 0004
"""

import hashlib
import importlib
import json

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

OLD_VIEWS = importlib.import_module("actdb.migrations.versions.0004_analyst_views").VIEWS

SET_LABELS = """activation_set s ON s.id = {key}
        JOIN checkpoint c ON c.id = s.checkpoint_id
        JOIN model m ON m.id = c.model_id
        JOIN dataset d ON d.id = s.dataset_id"""

# The one rule, spelled once for the views: universal when the excess beats the run's display threshold.
IS_UNIVERSAL = "CASE WHEN u.excess_corr > r.threshold THEN TRUE ELSE FALSE END"

VIEWS = {
    "v_universality": f"""
        SELECT u.run_id, r.control, r.threshold, m.name AS model, c.step, d.name AS dataset, u.layer, u.neuron,
               u.excess_corr, u.mean_max_corr, u.min_max_corr, u.mean_baseline,
               {IS_UNIVERSAL} AS is_universal, u.is_dead,
               st.mean AS act_mean, st.std AS act_std, st.skew AS act_skew, st.kurtosis AS act_kurtosis,
               st.frac_active AS act_frac_active, u.set_id
        FROM universality u
        JOIN correlation_run r ON r.id = u.run_id
        JOIN {SET_LABELS.format(key="u.set_id")}
        LEFT JOIN neuron_stat st ON st.set_id = u.set_id AND st.layer = u.layer AND st.neuron = u.neuron
        WHERE r.status = 'complete'
    """,
    "v_universal_neurons": """
        SELECT * FROM v_universality WHERE is_universal = TRUE
    """,
    "v_universal_by_layer": f"""
        SELECT u.run_id, r.control, r.threshold, m.name AS model, c.step, d.name AS dataset, u.layer,
               COUNT(*) AS n_neurons,
               SUM(CASE WHEN u.excess_corr > r.threshold THEN 1 ELSE 0 END) AS n_universal,
               SUM(CASE WHEN u.is_dead = TRUE THEN 1 ELSE 0 END) AS n_dead,
               CAST(100.0 * SUM(CASE WHEN u.excess_corr > r.threshold THEN 1 ELSE 0 END) AS DOUBLE PRECISION)
                   / COUNT(*) AS pct_universal,
               AVG(u.mean_max_corr) AS mean_max_corr, AVG(u.mean_baseline) AS mean_baseline,
               AVG(u.excess_corr) AS mean_excess_corr
        FROM universality u
        JOIN correlation_run r ON r.id = u.run_id
        JOIN {SET_LABELS.format(key="u.set_id")}
        WHERE r.status = 'complete'
        GROUP BY u.run_id, r.control, r.threshold, m.name, c.step, d.name, u.layer
    """,
    "v_neuron_matches": OLD_VIEWS["v_neuron_matches"],
    "v_persistence": """
        SELECT m.name AS model, d.name AS dataset, p.control, p.threshold, p.from_step, p.to_step, p.layer,
               p.n_universal_from, p.n_universal_to, p.n_kept, p.p_persist, p.jaccard, p.mean_self_corr,
               p.from_run_id, p.to_run_id, p.self_run_id
        FROM persistence p
        JOIN model m ON m.id = p.model_id
        JOIN dataset d ON d.id = p.dataset_id
    """,
    "v_ablation_summary": """
        SELECT a.id AS ablation_id, m.name AS model, c.step, d.name AS dataset, a.method, a.selector, a.threshold,
               a.n_neurons, a.tokens, a.base_loss, a.ablated_loss, a.delta, a.n_controls, a.control_mean,
               a.control_std, a.control_ci_low, a.control_ci_high, a.p_value, a.delta - a.control_mean AS
               delta_vs_controls, a.run_id, a.created_at
        FROM ablation a
        JOIN checkpoint c ON c.id = a.checkpoint_id
        JOIN model m ON m.id = c.model_id
        JOIN dataset d ON d.id = a.dataset_id
        WHERE a.status = 'complete'
    """,
    "v_neuron_history": """
        SELECT v.model, v.dataset, v.control, v.threshold, v.step, v.layer, v.neuron, v.run_id, v.excess_corr,
               v.mean_max_corr, v.mean_baseline, v.is_universal, v.is_dead, e.emergence_step
        FROM v_universality v
        JOIN model m ON m.name = v.model
        JOIN dataset d ON d.name = v.dataset
        LEFT JOIN neuron_emergence e ON e.model_id = m.id AND e.dataset_id = d.id AND e.control = v.control
             AND e.threshold = v.threshold AND e.layer = v.layer AND e.neuron = v.neuron
    """,
}


def _drop_views(views: dict) -> None:
    for name in reversed(list(views)):
        op.execute(f"DROP VIEW IF EXISTS {name}")


def _create_views(views: dict) -> None:
    for name, body in views.items():
        op.execute(f"CREATE VIEW {name} AS {body}")


def _correlation_key(set_ids: list[int], control: str, seed: int, topk: int) -> str:
    """The request key `actdb.compute.correlation.run` computes (the threshold is no longer part of it)."""
    payload = {"control": control, "kind": "correlate", "seed": seed, "sets": sorted(set_ids), "topk": topk}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _running_index(table: str) -> None:
    where = sa.text("status = 'running'")
    op.create_index(
        f"uq_{table}_running_request",
        table,
        ["request_key"],
        unique=True,
        sqlite_where=where,
        postgresql_where=where,
    )


def upgrade() -> None:
    conn = op.get_bind()
    _drop_views(OLD_VIEWS)

    with op.batch_alter_table("universality") as b:
        b.drop_column("is_universal")

    # activation_set: owner "host:pid" -> host, pid
    op.add_column("activation_set", sa.Column("host", sa.String(length=255), nullable=True))
    op.add_column("activation_set", sa.Column("pid", sa.Integer(), nullable=True))
    for set_id, owner in conn.execute(sa.text("SELECT id, owner FROM activation_set WHERE owner IS NOT NULL")):
        host, _, pid = owner.rpartition(":")
        conn.execute(
            sa.text("UPDATE activation_set SET host = :h, pid = :p WHERE id = :i"),
            {"h": host or None, "p": int(pid) if pid.isdigit() else None, "i": set_id},
        )
    op.execute("ALTER TABLE activation_set DROP COLUMN owner")

    # correlation_run: lifecycle columns, request keys without the threshold, no undead "running" rows
    op.add_column("correlation_run", sa.Column("host", sa.String(length=255), nullable=True))
    op.add_column("correlation_run", sa.Column("pid", sa.Integer(), nullable=True))
    op.add_column("correlation_run", sa.Column("heartbeat_at", sa.DateTime(), nullable=True))
    stuck = [r[0] for r in conn.execute(sa.text("SELECT id FROM correlation_run WHERE status = 'running'"))]
    for run_id in stuck:
        for table in ("neuron_match", "universality"):
            conn.execute(sa.text(f"DELETE FROM {table} WHERE run_id = :r"), {"r": run_id})
    conn.execute(
        sa.text(
            "UPDATE correlation_run SET status = 'abandoned', error = 'found running by the 0005 upgrade' "
            "WHERE status = 'running'"
        )
    )
    members: dict[int, list[int]] = {}
    for run_id, set_id in conn.execute(sa.text("SELECT run_id, set_id FROM run_member")):
        members.setdefault(run_id, []).append(set_id)
    for run_id, control, seed, topk in conn.execute(
        sa.text("SELECT id, control, baseline_seed, topk FROM correlation_run")
    ).all():
        conn.execute(
            sa.text("UPDATE correlation_run SET request_key = :k WHERE id = :i"),
            {"k": _correlation_key(members.get(run_id, []), control, seed, topk), "i": run_id},
        )
    _running_index("correlation_run")

    # persistence and emergence are keyed by the threshold that labelled them
    with op.batch_alter_table("persistence") as b:
        b.add_column(sa.Column("threshold", sa.Float(), nullable=False, server_default="0.5"))
    conn.execute(
        sa.text(
            "UPDATE persistence SET threshold = COALESCE("
            "(SELECT r.threshold FROM correlation_run r WHERE r.id = persistence.from_run_id), 0.5)"
        )
    )
    with op.batch_alter_table("persistence") as b:
        b.alter_column("threshold", server_default=None)
        b.drop_constraint("uq_persistence_key", type_="unique")
        b.create_unique_constraint(
            "uq_persistence_key", ["model_id", "dataset_id", "control", "threshold", "from_step", "to_step", "layer"]
        )
    with op.batch_alter_table("neuron_emergence") as b:
        b.add_column(sa.Column("threshold", sa.Float(), nullable=False, server_default="0.5"))
    conn.execute(
        sa.text(
            "UPDATE neuron_emergence SET threshold = COALESCE((SELECT MAX(p.threshold) FROM persistence p "
            "WHERE p.model_id = neuron_emergence.model_id AND p.dataset_id = neuron_emergence.dataset_id "
            "AND p.control = neuron_emergence.control), 0.5)"
        )
    )
    with op.batch_alter_table("neuron_emergence") as b:
        b.alter_column("threshold", server_default=None)
        b.drop_constraint("pk_neuron_emergence", type_="primary")
        b.create_primary_key(
            "pk_neuron_emergence", ["model_id", "dataset_id", "control", "threshold", "layer", "neuron"]
        )

    op.create_table(
        "persistence_run",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("request_key", sa.String(length=64), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("dataset_id", sa.Integer(), nullable=False),
        sa.Column("control", sa.String(length=20), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("steps", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=True),
        sa.Column("pid", sa.Integer(), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(), nullable=True),
        sa.Column("started_at", sa.DateTime(), nullable=True),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.Column("seconds", sa.Float(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["dataset_id"], ["dataset.id"], name=op.f("fk_persistence_run_dataset_id_dataset"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["model_id"], ["model.id"], name=op.f("fk_persistence_run_model_id_model"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_persistence_run")),
    )
    op.create_index(op.f("ix_persistence_run_request_key"), "persistence_run", ["request_key"], unique=False)
    _running_index("persistence_run")

    # ablation: a run like the others, with the threshold that chose `universal` neurons
    with op.batch_alter_table("ablation") as b:
        b.add_column(sa.Column("request_key", sa.String(length=64), nullable=True))
        b.add_column(sa.Column("threshold", sa.Float(), nullable=True))
        b.add_column(sa.Column("status", sa.String(length=20), nullable=False, server_default="complete"))
        b.add_column(sa.Column("host", sa.String(length=255), nullable=True))
        b.add_column(sa.Column("pid", sa.Integer(), nullable=True))
        b.add_column(sa.Column("heartbeat_at", sa.DateTime(), nullable=True))
        b.add_column(sa.Column("started_at", sa.DateTime(), nullable=True))
        b.add_column(sa.Column("finished_at", sa.DateTime(), nullable=True))
        b.add_column(sa.Column("error", sa.Text(), nullable=True))
        b.alter_column("base_loss", existing_type=sa.Float(), nullable=True)
        b.alter_column("seconds", existing_type=sa.Float(), nullable=True)
        b.alter_column("forward_passes", existing_type=sa.Integer(), nullable=True)
    conn.execute(
        sa.text(
            "UPDATE ablation SET threshold = (SELECT r.threshold FROM correlation_run r WHERE r.id = ablation.run_id) "
            "WHERE selector LIKE 'universal%'"
        )
    )
    conn.execute(sa.text("UPDATE ablation SET started_at = created_at, finished_at = created_at"))
    with op.batch_alter_table("ablation") as b:
        b.alter_column("status", server_default=None)
        b.create_index(op.f("ix_ablation_request_key"), ["request_key"], unique=False)
    _running_index("ablation")

    _create_views(VIEWS)


def downgrade() -> None:
    conn = op.get_bind()
    _drop_views(VIEWS)
    op.drop_index("uq_ablation_running_request", table_name="ablation")
    with op.batch_alter_table("ablation") as b:
        b.drop_index(op.f("ix_ablation_request_key"))
    conn.execute(sa.text("DELETE FROM ablation WHERE status <> 'complete'"))
    with op.batch_alter_table("ablation") as b:
        for name in (
            "request_key",
            "threshold",
            "status",
            "host",
            "pid",
            "heartbeat_at",
            "started_at",
            "finished_at",
            "error",
        ):
            b.drop_column(name)
        b.alter_column("base_loss", existing_type=sa.Float(), nullable=False)
        b.alter_column("seconds", existing_type=sa.Float(), nullable=False)
        b.alter_column("forward_passes", existing_type=sa.Integer(), nullable=False)
    op.drop_index("uq_persistence_run_running_request", table_name="persistence_run")
    op.drop_index(op.f("ix_persistence_run_request_key"), table_name="persistence_run")
    op.drop_table("persistence_run")
    # keep one threshold per key (the newest rows) so the narrower keys stay unique
    conn.execute(
        sa.text(
            "DELETE FROM neuron_emergence WHERE threshold < (SELECT MAX(e.threshold) FROM neuron_emergence e "
            "WHERE e.model_id = neuron_emergence.model_id AND e.dataset_id = neuron_emergence.dataset_id "
            "AND e.control = neuron_emergence.control)"
        )
    )
    with op.batch_alter_table("neuron_emergence") as b:
        b.drop_constraint("pk_neuron_emergence", type_="primary")
        b.create_primary_key("pk_neuron_emergence", ["model_id", "dataset_id", "control", "layer", "neuron"])
        b.drop_column("threshold")
    conn.execute(
        sa.text(
            "DELETE FROM persistence WHERE id NOT IN (SELECT MAX(p.id) FROM persistence p GROUP BY p.model_id, "
            "p.dataset_id, p.control, p.from_step, p.to_step, p.layer)"
        )
    )
    with op.batch_alter_table("persistence") as b:
        b.drop_constraint("uq_persistence_key", type_="unique")
        b.create_unique_constraint(
            "uq_persistence_key", ["model_id", "dataset_id", "control", "from_step", "to_step", "layer"]
        )
        b.drop_column("threshold")
    op.drop_index("uq_correlation_run_running_request", table_name="correlation_run")
    op.execute("ALTER TABLE correlation_run DROP COLUMN heartbeat_at")
    op.execute("ALTER TABLE correlation_run DROP COLUMN pid")
    op.execute("ALTER TABLE correlation_run DROP COLUMN host")
    op.add_column("activation_set", sa.Column("owner", sa.String(length=200), nullable=True))
    conn.execute(
        sa.text(
            "UPDATE activation_set SET owner = host || ':' || CAST(pid AS VARCHAR(20)) WHERE host IS NOT NULL "
            "AND pid IS NOT NULL"
        )
    )
    op.execute("ALTER TABLE activation_set DROP COLUMN pid")
    op.execute("ALTER TABLE activation_set DROP COLUMN host")
    with op.batch_alter_table("universality") as b:
        b.add_column(sa.Column("is_universal", sa.Boolean(), nullable=False, server_default=sa.false()))
    conn.execute(
        sa.text(
            "UPDATE universality SET is_universal = (excess_corr IS NOT NULL AND excess_corr > "
            "(SELECT r.threshold FROM correlation_run r WHERE r.id = universality.run_id))"
        )
    )
    with op.batch_alter_table("universality") as b:
        b.alter_column("is_universal", server_default=None)
    _create_views(OLD_VIEWS)
