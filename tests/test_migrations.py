"""The schema exists only through Alembic: round trips on SQLite and PostgreSQL, and ORM == migrations."""

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from actdb.store.database import tables
from actdb.store.database.connection import alembic_config, current_revision, head_revision, make_engine


def test_upgrade_downgrade_upgrade(db_url):
    cfg = alembic_config(db_url)
    engine = make_engine(db_url)
    command.upgrade(cfg, "head")
    assert current_revision(engine) == head_revision()
    tables = set(inspect(engine).get_table_names())
    assert {"model", "checkpoint", "dataset", "activation_set", "neuron_stat"} <= tables
    command.downgrade(cfg, "base")
    assert current_revision(engine) is None
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    command.upgrade(cfg, "head")
    assert current_revision(engine) == head_revision()
    engine.dispose()


def test_orm_models_match_migrations(db_url):
    command.upgrade(alembic_config(db_url), "head")
    engine = make_engine(db_url)
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        tables.declare_running_indexes()
        diff = compare_metadata(ctx, tables.metadata)
    engine.dispose()
    assert diff == []


def _fill_at_0004(engine, home):
    """A small store as actdb 0.1 (schema 0004) left it: two models, one step, a complete cross-model run at
    display threshold 0.2 plus one run stuck in `running`, persistence, emergence, an ablation with --each."""
    sql = [
        "INSERT INTO dataset VALUES (1, 'd', 'tok', 'fp', 300, 8, 2, 16, 14, 'sha', 'src', 0, "
        f"'{home}/datasets/d.tokens.h5', '2026-01-01')",
        "INSERT INTO model (id, name, family, architecture, n_layers, d_mlp, source, created_at) VALUES "
        "(1, 'a', 'gpt2', 'gpt2', 1, 4, '/src/a', '2026-01-01'), "
        "(2, 'b', 'gpt2', 'gpt2', 1, 4, '/src/b', '2026-01-01')",
        "INSERT INTO checkpoint (id, model_id, step, source, created_at) VALUES "
        "(1, 1, 5, '/src/a', '2026-01-01'), (2, 2, 5, '/src/b', '2026-01-01'), (3, 1, 9, '/src/a', '2026-01-01')",
        "INSERT INTO activation_set (id, checkpoint_id, dataset_id, hook, dtype, path, status, tokens_done, n_tokens, "
        f"owner) VALUES (1, 1, 1, 'mlp.post', 'float16', '{home}/activations/a/step-5/d.mlp.post.h5', 'complete', 16, "
        f"16, NULL), (2, 2, 1, 'mlp.post', 'float16', '{home}/activations/b/step-5/d.mlp.post.h5', 'complete', 16, "
        f"16, NULL), (3, 3, 1, 'mlp.post', 'float16', '{home}/activations/a/step-9/d.mlp.post.h5', 'running', 8, 16, "
        "'elsewhere:123')",
        "INSERT INTO correlation_run (id, request_key, dataset_id, kind, control, threshold, baseline_seed, topk, "
        "backend, status) VALUES (1, 'old1', 1, 'cross_model', 'none', 0.2, 0, 0, 'numpy', 'complete'), "
        "(2, 'old2', 1, 'cross_model', 'none', 0.2, 0, 0, 'numpy', 'running')",
        "INSERT INTO run_member VALUES (1, 1, 0), (1, 2, 1), (2, 1, 0), (2, 2, 1)",
    ]
    excess = [0.1, 0.3, 0.25, -0.05]
    for run in (1, 2):
        for set_id in (1, 2):
            for n, e in enumerate(excess):
                sql.append(
                    f"INSERT INTO universality VALUES ({run}, {set_id}, 0, {n}, {e + 0.4}, {e + 0.4}, 0.4, {e}, "
                    f"{'TRUE' if e > 0.2 else 'FALSE'}, FALSE)"
                )
                sql.append(
                    f"INSERT INTO neuron_match (run_id, set_id, other_set_id, layer, neuron, max_corr, best_layer, "
                    f"best_neuron, baseline_max_corr) VALUES ({run}, {set_id}, {3 - set_id}, 0, {n}, {e + 0.4}, 0, "
                    f"{n}, 0.4)"
                )
    sql += [
        "INSERT INTO persistence (id, model_id, dataset_id, control, from_step, to_step, layer, n_universal_from, "
        "n_universal_to, n_kept, p_persist, jaccard, mean_self_corr, from_run_id, to_run_id, self_run_id, created_at) "
        "VALUES (1, 1, 1, 'none', 5, 9, 0, 2, 2, 2, 1.0, 1.0, 0.9, 1, 1, 1, '2026-01-01')",
        "INSERT INTO neuron_emergence VALUES (1, 1, 'none', 0, 1, 5, '5,9')",
        "INSERT INTO ablation (id, checkpoint_id, dataset_id, run_id, method, selector, neurons, n_neurons, tokens, "
        "seed, base_loss, ablated_loss, delta, n_controls, each, seconds, forward_passes, created_at) VALUES "
        "(1, 1, 1, 1, 'mean', 'universal', '[\"0.1\", \"0.2\"]', 2, 14, 0, 3.0, 3.5, 0.5, 0, TRUE, 1.0, 4, "
        "'2026-01-01')",
        "INSERT INTO ablation_neuron VALUES (1, 0, 1, 3.2, 0.2), (1, 0, 2, 3.3, 0.3)",
    ]
    with engine.begin() as conn:
        for stmt in sql:
            conn.execute(text(stmt))


def test_store_at_0004_with_data_is_carried_forward(db_url, tmp_path):
    from actdb.compute.correlation.engine import CorrelationOptions
    from actdb.compute.correlation.run import correlation_key
    from actdb.query import queries
    from actdb.store.config import StoreConfig
    from actdb.store.database.connection import Store
    from actdb.store.database.schema import AblationNeuron, ActivationSet, CorrelationRun, Dataset, NeuronMatch

    home = tmp_path / "old-store"
    command.upgrade(alembic_config(db_url), "0004")
    engine = make_engine(db_url)
    _fill_at_0004(engine, home)
    engine.dispose()
    store = Store.init(StoreConfig.resolve(home, db_url))
    assert current_revision(store.engine) == head_revision()
    by_layer = queries.universal_by_layer(store, model="a")
    assert [(r["step"], r["n_universal"], r["threshold"]) for r in by_layer] == [(5, 2, 0.2)]
    assert queries.universal_by_layer(store, model="a", threshold=0.28)[0]["n_universal"] == 1
    listed = queries.universal_neurons(store, model="b")
    assert {r["neuron"] for r in listed} == {1, 2}
    assert {r["stability"] for r in listed} == {1.0}  # one draw: the label either holds or not
    view = store.query(text("SELECT * FROM v_universal_by_layer WHERE run_id = 1 AND model = 'a'")).first()
    assert view["n_universal"] == 2
    (pers,) = queries.persistence_listing(store, "a")
    assert pers["threshold"] == 0.2 and pers["n_kept"] == 2 and pers["hook"] == "mlp.post"  # 0020 backfill
    (abl,) = queries.ablations_listing(store)
    assert abl["threshold"] == 0.2 and abl["delta"] == 0.5
    history = store.query(text("SELECT emergence_step FROM v_neuron_history WHERE model = 'a' AND neuron = 1"))
    assert [r["emergence_step"] for r in history] == [5]
    with store.session() as s:
        assert s.query(AblationNeuron).count() == 2  # recreating `ablation` did not cascade into its children
        assert {d.path for d in s.query(Dataset)} == {"datasets/d.tokens.h5"}
        assert {a.path for a in s.query(ActivationSet)} == {
            "activations/a/step-5/d.mlp.post.h5",
            "activations/b/step-5/d.mlp.post.h5",
            "activations/a/step-9/d.mlp.post.h5",
        }
        stuck = s.get(ActivationSet, 3)
        assert (stuck.host, stuck.pid) == ("elsewhere", 123)
        old, dead = s.get(CorrelationRun, 1), s.get(CorrelationRun, 2)
        assert dead.status == "abandoned" and s.query(NeuronMatch).filter_by(run_id=2).count() == 0
        assert old.request_key == correlation_key([1, 2], CorrelationOptions(baseline_draws=1))
        assert old.baseline_draws == 1
    store.close()


def test_known_revisions_follow_alembic_history():
    """The light revision check (file names) agrees with Alembic's own linear history."""
    from alembic.script import ScriptDirectory

    from actdb.store.database.connection import known_revisions

    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    history = [r.revision for r in reversed(list(script.walk_revisions()))]
    assert known_revisions() == history
    assert head_revision() == script.get_current_head()
