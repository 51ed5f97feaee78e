"""The analyst views (created by Alembic revisions, never here) as SQLAlchemy Core tables, so code queries them
by column name with bound parameters. A test checks these columns against the views on SQLite and PostgreSQL."""

from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, Column, DateTime, Float, Integer, MetaData, String, Table

VIEWS = MetaData()  # separate from the ORM metadata: Alembic must not think these are tables


def _view(name: str, *columns: Column) -> Table:
    return Table(name, VIEWS, *columns)


def _universality_columns() -> list[Column]:
    return [
        Column("run_id", Integer),
        Column("control", String),
        Column("threshold", Float),
        Column("model", String),
        Column("step", BigInteger),
        Column("dataset", String),
        Column("hook", String),
        Column("layer", Integer),
        Column("neuron", Integer),
        Column("excess_corr", Float),
        Column("stability", Float),
        Column("z", Float),
        Column("mean_max_corr", Float),
        Column("min_max_corr", Float),
        Column("mean_baseline", Float),
        Column("baseline_sd", Float),
        Column("n_draws", Integer),
        Column("is_universal", Boolean),
        Column("is_dead", Boolean),
        Column("act_mean", Float),
        Column("act_std", Float),
        Column("act_skew", Float),
        Column("act_kurtosis", Float),
        Column("act_frac_active", Float),
        Column("set_id", Integer),
        Column("excess_draws", String),
    ]


def _by_layer_columns() -> list[Column]:
    return [
        Column("run_id", Integer),
        Column("control", String),
        Column("threshold", Float),
        Column("model", String),
        Column("step", BigInteger),
        Column("dataset", String),
        Column("hook", String),
        Column("layer", Integer),
        Column("n_neurons", Integer),
        Column("n_universal", Integer),
        Column("n_dead", Integer),
        Column("pct_universal", Float),
        Column("mean_max_corr", Float),
        Column("mean_baseline", Float),
        Column("mean_excess_corr", Float),
        Column("set_id", Integer),
    ]


v_universality = _view("v_universality", *_universality_columns())
v_universal_neurons = _view("v_universal_neurons", *_universality_columns())
v_universal_by_layer = _view("v_universal_by_layer", *_by_layer_columns())
# One row per neuron per set per control: each set's run chosen by the CLI's rule (`labels.newest_runs`).
v_canonical_runs = _view(
    "v_canonical_runs",
    Column("set_id", Integer),
    Column("control", String),
    Column("run_id", Integer),
    Column("n_members", Integer),
)
v_canonical_universality = _view("v_canonical_universality", *_universality_columns())
v_canonical_universal_neurons = _view("v_canonical_universal_neurons", *_universality_columns())
v_canonical_universal_by_layer = _view("v_canonical_universal_by_layer", *_by_layer_columns())
v_neuron_matches = _view(
    "v_neuron_matches",
    Column("run_id", Integer),
    Column("control", String),
    Column("model", String),
    Column("step", BigInteger),
    Column("dataset", String),
    Column("hook", String),
    Column("layer", Integer),
    Column("neuron", Integer),
    Column("other_model", String),
    Column("other_step", BigInteger),
    Column("other_hook", String),
    Column("max_corr", Float),
    Column("best_layer", Integer),
    Column("best_neuron", Integer),
    Column("baseline_max_corr", Float),
    Column("baseline_sd", Float),
    Column("self_corr", Float),
)
v_persistence = _view(
    "v_persistence",
    Column("model", String),
    Column("dataset", String),
    Column("control", String),
    Column("threshold", Float),
    Column("from_step", BigInteger),
    Column("to_step", BigInteger),
    Column("layer", Integer),
    Column("n_universal_from", Integer),
    Column("n_universal_to", Integer),
    Column("n_kept", Integer),
    Column("p_persist", Float),
    Column("jaccard", Float),
    Column("mean_self_corr", Float),
    Column("from_run_id", Integer),
    Column("to_run_id", Integer),
    Column("self_run_id", Integer),
)
v_ablation_summary = _view(
    "v_ablation_summary",
    Column("ablation_id", Integer),
    Column("model", String),
    Column("step", BigInteger),
    Column("dataset", String),
    Column("method", String),
    Column("selector", String),
    Column("threshold", Float),
    Column("n_neurons", Integer),
    Column("tokens", BigInteger),
    Column("base_loss", Float),
    Column("ablated_loss", Float),
    Column("delta", Float),
    Column("n_controls", Integer),
    Column("control_mean", Float),
    Column("control_std", Float),
    Column("control_min", Float),
    Column("control_max", Float),
    Column("control_ci_low", Float),
    Column("control_ci_high", Float),
    Column("p_value", Float),
    Column("p_floor", Float),
    Column("delta_vs_controls", Float),
    Column("run_id", Integer),
    Column("created_at", DateTime),
)
v_neuron_history = _view(
    "v_neuron_history",
    Column("model", String),
    Column("dataset", String),
    Column("hook", String),
    Column("control", String),
    Column("threshold", Float),
    Column("step", BigInteger),
    Column("layer", Integer),
    Column("neuron", Integer),
    Column("run_id", Integer),
    Column("excess_corr", Float),
    Column("stability", Float),
    Column("mean_max_corr", Float),
    Column("mean_baseline", Float),
    Column("is_universal", Boolean),
    Column("is_dead", Boolean),
    Column("emergence_step", BigInteger),
)
v_similarity = _view(
    "v_similarity",
    Column("run_id", Integer),
    Column("control", String),
    Column("n_draws", Integer),
    Column("model", String),
    Column("step", BigInteger),
    Column("dataset", String),
    Column("hook", String),
    Column("layer", Integer),
    Column("other_model", String),
    Column("other_step", BigInteger),
    Column("other_hook", String),
    Column("other_layer", Integer),
    Column("mean_max_corr", Float),
    Column("mean_baseline", Float),
    Column("baseline_sd", Float),
    Column("excess_corr", Float),
    Column("matched_corr", Float),
    Column("cka", Float),
    Column("set_id", Integer),
    Column("other_set_id", Integer),
)
v_neuron_explanations = _view(
    "v_neuron_explanations",
    Column("model", String),
    Column("step", BigInteger),
    Column("dataset", String),
    Column("hook", String),
    Column("layer", Integer),
    Column("neuron", Integer),
    Column("max_activation", Float),
    Column("token_r2", Float),
    Column("position_r2", Float),
    Column("top_token", Integer),
    Column("top_token_mean", Float),
    Column("top_token_count", Integer),
    Column("vocab_mean", Float),
    Column("vocab_var", Float),
    Column("vocab_skew", Float),
    Column("vocab_kurtosis", Float),
    Column("vocab_label", String),
    Column("family", String),
    Column("token_min_r2", Float),
    Column("position_min_r2", Float),
    Column("vocab_kurtosis_min", Float),
    Column("vocab_skew_min", Float),
    Column("set_id", Integer),
)
v_neuron_families = _view(
    "v_neuron_families",
    Column("run_id", Integer),
    Column("control", String),
    Column("threshold", Float),
    Column("model", String),
    Column("step", BigInteger),
    Column("dataset", String),
    Column("hook", String),
    Column("layer", Integer),
    Column("neuron", Integer),
    Column("excess_corr", Float),
    Column("stability", Float),
    Column("token_r2", Float),
    Column("position_r2", Float),
    Column("top_token", Integer),
    Column("vocab_skew", Float),
    Column("vocab_kurtosis", Float),
    Column("vocab_label", String),
    Column("family", String),
    Column("set_id", Integer),
)
v_trajectories = _view(
    "v_trajectories",
    Column("run_id", Integer),
    Column("dataset", String),
    Column("model", String),
    Column("step", BigInteger),
    Column("other_model", String),
    Column("other_step", BigInteger),
    Column("metric", String),
    Column("value", Float),
    Column("n_targets", BigInteger),
)
v_trajectory_points = _view(
    "v_trajectory_points",
    Column("run_id", Integer),
    Column("dataset", String),
    Column("model", String),
    Column("step", BigInteger),
    Column("n_targets", BigInteger),
    Column("top1_accuracy", Float),
    Column("mean_loss", Float),
    Column("bt_strength", Float),
    Column("distance", String),
    Column("embedding", String),
    Column("map_x", Float),
    Column("map_y", Float),
)


def _concept_run_columns() -> list[Column]:
    return [
        Column("run_id", Integer),
        Column("concept_set", String),
        Column("model", String),
        Column("step", BigInteger),
        Column("dataset", String),
        Column("hook", String),
        Column("pool", String),
        Column("mask_concept_token", Boolean),
    ]


v_concept_scores = _view(
    "v_concept_scores",
    *_concept_run_columns(),
    Column("k", Integer),
    Column("tau", Float),
    Column("concept", String),
    Column("n_positive", Integer),
    Column("n_negative", Integer),
    Column("best_ap", Float),
    Column("best_auroc", Float),
    Column("kth_ap", Float),
    Column("null_best_q99", Float),
    Column("null_kth_q99", Float),
    Column("excess_ap", Float),
    Column("p_best", Float),
    Column("n_permutations", Integer),
    Column("n_above_tau", Integer),
    Column("set_id", Integer),
)
v_concept_experts = _view(
    "v_concept_experts",
    *_concept_run_columns(),
    Column("k", Integer),
    Column("concept", String),
    Column("rank", Integer),
    Column("layer", Integer),
    Column("neuron", Integer),
    Column("ap", Float),
    Column("auroc", Float),
    Column("set_id", Integer),
)
v_concept_alignment = _view(
    "v_concept_alignment",
    *_concept_run_columns(),
    Column("reference", String),
    Column("rho", Float),
    Column("p", Float),
    Column("n_permutations", Integer),
    Column("n_pairs", Integer),
    Column("triplet_accuracy", Float),
    Column("n_triplets", Integer),
    Column("set_id", Integer),
)
