"""The store's tables as SQLAlchemy Core `Table`s: what every reader selects from, with no ORM import.

The tables themselves are created only by Alembic revisions (`migrations/`); a test compares these declarations
with the migrated database. Writers that want objects use the ORM classes mapped onto these same tables in
`store.database.schema`, which only writers import."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
metadata = MetaData(naming_convention=NAMING)

DEFAULT_THRESHOLD = 0.5  # excess correlation above which a neuron is universal (Gurnee et al. 2024)


def utcnow() -> datetime:
    """Naive UTC now: what every timestamp column holds (SQLite has no time zones)."""
    return datetime.now(UTC).replace(tzinfo=None)


def run_state_columns() -> list[Column]:
    """Lifecycle columns shared by every run table (`store.database.lifecycle`): claim -> running -> complete |
    failed, or `abandoned` when the owning process (host, pid) died or stopped sending heartbeats."""
    return [
        Column("status", String(20), default="pending", nullable=False),
        Column("host", String(255)),
        Column("pid", Integer),
        Column("heartbeat_at", DateTime),
        Column("started_at", DateTime),
        Column("finished_at", DateTime),
        Column("seconds", Float),
        Column("error", Text),
    ]


# One independently trained model (a seed); its checkpoints share architecture and width.
model = Table(
    "model",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(200), unique=True, nullable=False),
    Column("family", String(50), nullable=False),
    Column("seed", String(50)),
    Column("architecture", String(50), nullable=False),
    Column("n_layers", Integer, nullable=False),
    Column("d_mlp", Integer, nullable=False),
    Column("source", Text, nullable=False),
    Column("revision_template", String(200)),
    Column("created_at", DateTime, default=utcnow, nullable=False),
)


# A model at one training step, loaded from `source` at `revision`; `weights_sha256` fingerprints the
# weights that were loaded, so another step's or another model's weights are never stored under this name.
checkpoint = Table(
    "checkpoint",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("model_id", ForeignKey("model.id", ondelete="CASCADE"), nullable=False),
    Column("step", BigInteger, nullable=False),
    Column("source", Text, nullable=False),
    Column("revision", String(200)),
    Column("source_sha", String(100)),
    Column("weights_sha256", String(64)),
    Column("created_at", DateTime, default=utcnow, nullable=False),
    UniqueConstraint("model_id", "step"),
)


# A token dataset shared by every model: packed sequences plus the mask of counted positions.
dataset = Table(
    "dataset",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(200), unique=True, nullable=False),
    Column("tokenizer", Text, nullable=False),
    Column("tokenizer_fingerprint", String(64), nullable=False),
    Column("vocab_size", Integer, nullable=False),
    Column("seq_len", Integer, nullable=False),
    Column("n_sequences", Integer, nullable=False),
    Column("n_tokens", BigInteger, nullable=False),
    Column("n_counted", BigInteger, nullable=False),
    Column("token_sha256", String(64), nullable=False),
    Column("excluded_tokens", Text, default="[]", nullable=False),  # JSON list of token ids that never count
    Column("fingerprint", String(64), nullable=False),  # token ids + exclusions; what activation files name
    Column("source", Text, nullable=False),
    Column("seed", Integer, nullable=False),
    Column("path", Text, nullable=False),  # relative to the store folder
    Column("created_at", DateTime, default=utcnow, nullable=False),
)


# One checkpoint's activations on one dataset at one hook: an HDF5 file and its ingest state.
activation_set = Table(
    "activation_set",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("checkpoint_id", ForeignKey("checkpoint.id", ondelete="CASCADE"), nullable=False),
    Column("dataset_id", ForeignKey("dataset.id", ondelete="CASCADE"), nullable=False),
    Column("hook", String(50), nullable=False),
    Column("dtype", String(20), nullable=False),
    Column("path", Text, nullable=False),  # relative to the store folder
    Column("tokens_done", BigInteger, default=0, nullable=False),
    Column("n_tokens", BigInteger, nullable=False),
    Column("bytes", BigInteger),
    *run_state_columns(),
    UniqueConstraint("checkpoint_id", "dataset_id", "hook"),
)


# Moments of one neuron's activation over a dataset's counted positions.
neuron_stat = Table(
    "neuron_stat",
    metadata,
    Column("set_id", ForeignKey("activation_set.id", ondelete="CASCADE"), primary_key=True),
    Column("layer", Integer, primary_key=True),
    Column("neuron", Integer, primary_key=True),
    Column("count", BigInteger, nullable=False),
    Column("mean", Float, nullable=False),
    Column("std", Float, nullable=False),
    Column("skew", Float),
    Column("kurtosis", Float),
    Column("frac_active", Float, nullable=False),
    Column("min", Float, nullable=False),
    Column("max", Float, nullable=False),
)


# A set's explanation file (examples, token/position fractions, vocabulary statistics) and the thresholds
# its neuron families use; see `actdb.compute.explain.run`.
set_explanation = Table(
    "set_explanation",
    metadata,
    Column("set_id", ForeignKey("activation_set.id", ondelete="CASCADE"), primary_key=True),
    Column("path", Text, nullable=False),
    Column("top_k", Integer, nullable=False),
    Column("min_count", Integer, nullable=False),
    Column("n_tokens", BigInteger, nullable=False),
    Column("n_token_ids", Integer, nullable=False),
    Column("n_positions", Integer, nullable=False),
    Column("token_min_r2", Float, nullable=False),
    Column("position_min_r2", Float, nullable=False),
    Column("vocab_kurtosis_min", Float),
    Column("vocab_skew_min", Float),
    Column("created_at", DateTime, default=utcnow),
)


# Per neuron: variance fractions explained by token id and position, the top token by mean activation,
# and the vocabulary moments of its output weights through the unembedding.
neuron_explanation = Table(
    "neuron_explanation",
    metadata,
    Column("set_id", ForeignKey("activation_set.id", ondelete="CASCADE"), primary_key=True),
    Column("layer", Integer, primary_key=True),
    Column("neuron", Integer, primary_key=True),
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
    Column("vocab_label", String(20)),
)


# One request to correlate a list of activation sets on one dataset, and its outcome.
#
# `kind` is `cross_model` when every member is a different model (its universality scores are the ones
# listings and ablations use) and `within_model` when a model appears at several steps (persistence).
# `threshold` is not part of the request: it is the default for displaying labels (`excess_corr > threshold`),
# which every reader may override.
correlation_run = Table(
    "correlation_run",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("request_key", String(64), index=True, nullable=False),
    Column("dataset_id", ForeignKey("dataset.id", ondelete="CASCADE"), nullable=False),
    Column("kind", String(20), nullable=False),
    Column("control", String(20), nullable=False),
    Column("threshold", Float, nullable=False),
    Column("baseline_seed", Integer, nullable=False),
    Column("baseline_draws", Integer, default=1, nullable=False),
    Column("topk", Integer, nullable=False),
    Column("backend", String(20), nullable=False),
    Column("n_tokens", BigInteger),
    Column("n_passes", Integer),
    Column("n_dead", Integer),
    Column("bytes_read", BigInteger),  # stored value bytes the run's readers returned, over every pass
    Column("bytes_held", BigInteger),  # stored value bytes of its sets' files (read amplification = read / held)
    *run_state_columns(),
)


# An activation set taking part in a correlation run.
run_member = Table(
    "run_member",
    metadata,
    Column("run_id", ForeignKey("correlation_run.id", ondelete="CASCADE"), primary_key=True),
    Column("set_id", ForeignKey("activation_set.id", ondelete="CASCADE"), primary_key=True),
    Column("position", Integer, nullable=False),
)


# A neuron's best match among all neurons of another set, and the same under a random rotation.
neuron_match = Table(
    "neuron_match",
    metadata,
    Column("run_id", ForeignKey("correlation_run.id", ondelete="CASCADE"), primary_key=True),
    Column("set_id", ForeignKey("activation_set.id", ondelete="CASCADE"), primary_key=True),
    Column("other_set_id", ForeignKey("activation_set.id", ondelete="CASCADE"), primary_key=True),
    Column("layer", Integer, primary_key=True),
    Column("neuron", Integer, primary_key=True),
    Column("max_corr", Float),
    Column("best_layer", Integer),
    Column("best_neuron", Integer),
    Column("baseline_max_corr", Float),  # mean over baseline draws
    Column("baseline_sd", Float),  # sd over baseline draws
    Column("topk", Text),
    Column("self_corr", Float),
    # one neuron's rows across runs and other sets (its page, its history over steps) without scanning the table
    Index("ix_neuron_match_set_neuron", "set_id", "layer", "neuron"),
)


# How much a neuron's best match in the other sets beats the rotation baseline; universal when
# `excess_corr > threshold`, evaluated where it is read (`store.database.labels`).
universality = Table(
    "universality",
    metadata,
    Column("run_id", ForeignKey("correlation_run.id", ondelete="CASCADE"), primary_key=True),
    Column("set_id", ForeignKey("activation_set.id", ondelete="CASCADE"), primary_key=True),
    Column("layer", Integer, primary_key=True),
    Column("neuron", Integer, primary_key=True),
    Column("mean_max_corr", Float),
    Column("min_max_corr", Float),
    Column("mean_baseline", Float),
    Column("baseline_sd", Float),
    Column("excess_corr", Float),
    Column("z", Float),  # excess / this neuron's own baseline sd (rests on n_draws)
    Column("z_pooled", Float),  # excess / the layer-pooled, shrunk baseline sd
    Column("n_draws", Integer),  # baseline draws its scores rest on (NULL: the run's)
    Column("stability", Float),  # share of draws universal at the run's threshold
    Column("excess_draws", Text),  # the excess against each draw, sorted, comma-separated
    Column("is_dead", Boolean, nullable=False),
    Index("ix_universality_set_layer", "set_id", "layer"),
)


# One request to compute persistence of a model's universal neurons across analysed steps.
persistence_run = Table(
    "persistence_run",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("request_key", String(64), index=True, nullable=False),
    Column("model_id", ForeignKey("model.id", ondelete="CASCADE"), nullable=False),
    Column("dataset_id", ForeignKey("dataset.id", ondelete="CASCADE"), nullable=False),
    Column("hook", String(50), nullable=False),  # of the sets it read
    Column("control", String(20), nullable=False),
    Column("threshold", Float, nullable=False),
    Column("steps", Text, nullable=False),
    *run_state_columns(),
)


# A checkpoint's top-1 predictions and per-token losses on a dataset (`actdb predictions`), in an HDF5 file
# beside its activations.
prediction_set = Table(
    "prediction_set",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("request_key", String(64), index=True, nullable=False),
    Column("checkpoint_id", ForeignKey("checkpoint.id", ondelete="CASCADE"), nullable=False),
    Column("dataset_id", ForeignKey("dataset.id", ondelete="CASCADE"), nullable=False),
    Column("path", Text, nullable=False),  # relative to the store folder
    Column("n_tokens", BigInteger),
    Column("mean_loss", Float),
    *run_state_columns(),
)


# How alike one layer of a set is to one layer of another set (or itself) in a similarity run: mean best
# correlation of its neurons there (and against rotated copies: mean and sd over draws), the one-to-one
# matched correlation (same-index layers only) and linear CKA.
layer_similarity = Table(
    "layer_similarity",
    metadata,
    Column("run_id", ForeignKey("correlation_run.id", ondelete="CASCADE"), primary_key=True),
    Column("set_id", ForeignKey("activation_set.id", ondelete="CASCADE"), primary_key=True),
    Column("other_set_id", ForeignKey("activation_set.id", ondelete="CASCADE"), primary_key=True),
    Column("layer", Integer, primary_key=True),
    Column("other_layer", Integer, primary_key=True),
    Column("mean_max_corr", Float),
    Column("mean_baseline", Float),
    Column("baseline_sd", Float),
    Column("matched_corr", Float),
    Column("cka", Float),
)


# How many of one layer's universal neurons (excess > threshold) at `from_step` are still universal at
# `to_step`.
persistence = Table(
    "persistence",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("model_id", ForeignKey("model.id", ondelete="CASCADE"), nullable=False),
    Column("dataset_id", ForeignKey("dataset.id", ondelete="CASCADE"), nullable=False),
    Column("hook", String(50), nullable=False),  # of the sets it compares
    Column("control", String(20), nullable=False),
    Column("threshold", Float, nullable=False),
    Column("from_step", BigInteger, nullable=False),
    Column("to_step", BigInteger, nullable=False),
    Column("layer", Integer, nullable=False),
    Column("n_universal_from", Integer, nullable=False),
    Column("n_universal_to", Integer, nullable=False),
    Column("n_kept", Integer, nullable=False),
    Column("p_persist", Float),
    Column("jaccard", Float),
    Column("mean_self_corr", Float),  # over every neuron of the layer
    Column("mean_self_corr_universal", Float),  # over those universal at from_step
    Column("from_run_id", ForeignKey("correlation_run.id", ondelete="CASCADE"), nullable=False),
    Column("to_run_id", ForeignKey("correlation_run.id", ondelete="CASCADE"), nullable=False),
    Column("self_run_id", ForeignKey("correlation_run.id", ondelete="CASCADE"), nullable=False),
    Column("created_at", DateTime, default=utcnow, nullable=False),
    UniqueConstraint(
        "hook",
        "model_id",
        "dataset_id",
        "control",
        "threshold",
        "from_step",
        "to_step",
        "layer",
        name="uq_persistence_key",
    ),
)


# The first analysed step from which a neuron stays universal (NULL: not universal at the last step).
neuron_emergence = Table(
    "neuron_emergence",
    metadata,
    Column("model_id", ForeignKey("model.id", ondelete="CASCADE"), primary_key=True),
    Column("dataset_id", ForeignKey("dataset.id", ondelete="CASCADE"), primary_key=True),
    Column("hook", String(50), primary_key=True),
    Column("control", String(20), primary_key=True),
    Column("threshold", Float, primary_key=True),
    Column("layer", Integer, primary_key=True),
    Column("neuron", Integer, primary_key=True),
    Column("emergence_step", BigInteger),
    Column("steps", Text, nullable=False),
)


# Cross-entropy of a checkpoint with chosen neurons replaced, against the clean run and random controls.
#
# `threshold` is the excess correlation that chose the neurons when the selector was `universal`.
ablation = Table(
    "ablation",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("request_key", String(64), index=True),
    Column("checkpoint_id", ForeignKey("checkpoint.id", ondelete="CASCADE"), nullable=False),
    Column("dataset_id", ForeignKey("dataset.id", ondelete="CASCADE"), nullable=False),
    Column("run_id", ForeignKey("correlation_run.id", ondelete="SET NULL")),
    Column("hook", String(50), nullable=False),  # of the set whose labels chose the neurons (edits: mlp.post)
    Column("method", String(20), nullable=False),
    Column("selector", Text, nullable=False),
    Column("threshold", Float),
    Column("neurons", Text, nullable=False),
    Column("n_neurons", Integer, nullable=False),
    Column("tokens", BigInteger, nullable=False),
    Column("seed", Integer, nullable=False),
    Column("eval_split", String(20), nullable=False),  # held_out | in_sample | listed
    Column("eval_sequences", Text),  # measured sequences of `dataset_id`, as ranges
    Column("n_eval_sequences", Integer),
    Column("positions", String(20), nullable=False),  # counted | all: where activations are replaced
    Column("selection_dataset_id", ForeignKey("dataset.id", ondelete="SET NULL", name="fk_ablation_selection_dataset")),
    Column("base_loss", Float),
    Column("ablated_loss", Float),
    Column("delta", Float),
    Column("n_controls", Integer, nullable=False),
    Column("control_mean", Float),
    Column("control_std", Float),
    Column("control_ci_low", Float),
    Column("control_ci_high", Float),
    Column("control_min", Float),
    Column("control_max", Float),
    Column("control_deltas", Text),  # JSON list, one delta per control set
    Column("p_value", Float),
    Column("each", Boolean, nullable=False),
    Column("forward_passes", Integer),
    Column("created_at", DateTime, default=utcnow, nullable=False),
    *run_state_columns(),
)


# One neuron ablated on its own (`actdb ablate --each`).
ablation_neuron = Table(
    "ablation_neuron",
    metadata,
    Column("ablation_id", ForeignKey("ablation.id", ondelete="CASCADE"), primary_key=True),
    Column("layer", Integer, primary_key=True),
    Column("neuron", Integer, primary_key=True),
    Column("ablated_loss", Float, nullable=False),
    Column("delta", Float, nullable=False),
)


# One `actdb trajectories` request: every checkpoint of `sets` against every other on a dataset's stored
# predictions (and weights), with the map's distance and embedding and the run-level counts.
trajectory_run = Table(
    "trajectory_run",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("request_key", String(64), index=True, nullable=False),
    Column("dataset_id", ForeignKey("dataset.id", ondelete="CASCADE"), nullable=False),
    Column("sets", Text, nullable=False),  # MODEL@STEP, comma-separated, in the run's order
    Column("eps", Float, nullable=False),
    Column("distance", String(20), nullable=False),
    Column("embedding", String(20), nullable=False),
    Column("seed", Integer, nullable=False),
    Column("exact_tokens", BigInteger),
    Column("weights", Boolean, nullable=False),
    Column("reference_checkpoint_id", ForeignKey("checkpoint.id", ondelete="SET NULL")),
    Column("n_checkpoints", Integer),
    Column("n_targets", BigInteger),  # the fewest targets any pair was compared on
    Column("n_triples", Integer),
    Column("n_nontransitive", Integer),
    Column("map_stress", Float),  # Kruskal stress-1 of the MDS map
    *run_state_columns(),
)


# One measure of one ordered pair of checkpoints in a trajectory run (long format).
trajectory_value = Table(
    "trajectory_value",
    metadata,
    Column("run_id", ForeignKey("trajectory_run.id", ondelete="CASCADE"), primary_key=True),
    Column("checkpoint_id", ForeignKey("checkpoint.id", ondelete="CASCADE"), primary_key=True),
    Column("other_checkpoint_id", ForeignKey("checkpoint.id", ondelete="CASCADE"), primary_key=True),
    Column("metric", String(40), primary_key=True),
    Column("value", Float),
    Column("n_targets", BigInteger),  # targets (or None: parameters) the value rests on
)


# One checkpoint of a trajectory run: top-1 accuracy, mean loss, Bradley-Terry strength, map coordinates.
trajectory_point = Table(
    "trajectory_point",
    metadata,
    Column("run_id", ForeignKey("trajectory_run.id", ondelete="CASCADE"), primary_key=True),
    Column("checkpoint_id", ForeignKey("checkpoint.id", ondelete="CASCADE"), primary_key=True),
    Column("n_targets", BigInteger),
    Column("top1_accuracy", Float),
    Column("mean_loss", Float),
    Column("bt_strength", Float),
    Column("map_x", Float),
    Column("map_y", Float),
)


# A forced redo of a complete activation set (`ingest --force`): its lifecycle lives here, not in the set's
# status, so the set stays complete (and readable) until its replacement is; a failed redo is a failed attempt
# with its error, and the set keeps its file, statistics and status.
ingest_attempt = Table(
    "ingest_attempt",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("request_key", String(64), index=True, nullable=False),  # one running redo per set
    Column("set_id", ForeignKey("activation_set.id", ondelete="CASCADE"), index=True, nullable=False),
    Column("dtype", String(20), nullable=False),
    Column("tokens_done", BigInteger, default=0, nullable=False),
    *run_state_columns(),
)


# The one row binding a database to its store folder: the same id is kept in the folder's `actdb-store-id`
# file, so a second store initialised on this database (another folder) is refused.
store_identity = Table(
    "store_identity",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("store_id", String(36), unique=True, nullable=False),
    Column("home", Text, nullable=False),  # the folder at `actdb init` (informative: a store may move)
    Column("created_at", DateTime, default=utcnow, nullable=False),
)


# A named concepts file (`actdb concept add`): its canonical JSONL and fingerprint.
concept_set = Table(
    "concept_set",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(200), unique=True, nullable=False),
    Column("fingerprint", String(64), nullable=False),
    Column("n_concepts", Integer, nullable=False),
    Column("body", Text, nullable=False),
    Column("created_at", DateTime, default=utcnow, nullable=False),
)


# Expert neurons of one activation set's checkpoint for a concept set (`actdb concept run`): AP arrays in
# an HDF5 sidecar beside the set's activations, top-k experts and summaries in SQL.
concept_run = Table(
    "concept_run",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("request_key", String(64), index=True, nullable=False),
    Column("concept_set_id", ForeignKey("concept_set.id", ondelete="CASCADE"), nullable=False),
    Column("set_id", ForeignKey("activation_set.id", ondelete="CASCADE"), nullable=False),
    Column("hook", String(50), nullable=False),
    Column("pool", String(10), nullable=False),
    Column("mask_concept_token", Boolean, nullable=False),
    Column("k", Integer, nullable=False),
    Column("tau", Float, nullable=False),
    Column("n_permutations", Integer, nullable=False),
    Column("seed", Integer, nullable=False),
    Column("path", Text, nullable=False),  # the AP sidecar, relative to the store folder
    Column("n_sentences", Integer),
    Column("n_neurons", Integer),
    Column("n_empty", Integer),  # sentences left with no counted token (response 0)
    Column("created_at", DateTime, default=utcnow, nullable=False),
    *run_state_columns(),
)


# One concept's summary in a concept run: best AP and AUROC, the permutation null, experts above tau.
concept_score = Table(
    "concept_score",
    metadata,
    Column("run_id", ForeignKey("concept_run.id", ondelete="CASCADE"), primary_key=True),
    Column("concept", String(200), primary_key=True),
    Column("n_positive", Integer, nullable=False),
    Column("n_negative", Integer, nullable=False),
    Column("best_ap", Float, nullable=False),
    Column("best_auroc", Float, nullable=False),
    Column("kth_ap", Float, nullable=False),
    Column("null_best_q99", Float),
    Column("null_kth_q99", Float),
    Column("excess_ap", Float),
    Column("p_best", Float),
    Column("n_above_tau", Integer, nullable=False),
)


# One of a concept's top-k neurons by AP in a concept run.
concept_expert = Table(
    "concept_expert",
    metadata,
    Column("run_id", ForeignKey("concept_run.id", ondelete="CASCADE"), primary_key=True),
    Column("concept", String(200), primary_key=True),
    Column("rank", Integer, primary_key=True),
    Column("layer", Integer, nullable=False),
    Column("neuron", Integer, nullable=False),
    Column("ap", Float, nullable=False),
    Column("auroc", Float, nullable=False),
    Index("ix_concept_expert_neuron", "layer", "neuron"),  # the concepts a neuron is an expert for (its page)
)


# RSA of a concept run's concept x concept similarity with a reference (the taxonomy, or a human file).
concept_alignment = Table(
    "concept_alignment",
    metadata,
    Column("run_id", ForeignKey("concept_run.id", ondelete="CASCADE"), primary_key=True),
    Column("reference", String(200), primary_key=True),
    Column("rho", Float),
    Column("p", Float),
    Column("n_permutations", Integer, nullable=False),
    Column("n_pairs", Integer, nullable=False),
    Column("triplet_accuracy", Float),
    Column("n_triplets", Integer),
)


# One `actdb robustness run`: do seeds respond alike to one intervention (an ablation rule, an edit generator or
# a file of edits), at each of their common steps, on the first `n_contexts` sequences of a dataset.
robustness_run = Table(
    "robustness_run",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("request_key", String(64), index=True, nullable=False),
    Column("intervention", String(20), nullable=False),  # ablate, generate or edits
    Column("spec", Text, nullable=False),  # the rule, the generator, or the edits file and its sha256
    Column("method", String(10)),  # zero or mean (ablations)
    Column("models", Text, nullable=False),  # JSON list of the seeds' model names
    Column("steps", Text, nullable=False),  # JSON list
    Column("n_seeds", Integer, nullable=False),
    Column("dataset_id", ForeignKey("dataset.id", ondelete="CASCADE"), nullable=False),
    Column("eval_dataset_id", ForeignKey("dataset.id", ondelete="CASCADE")),  # contexts (None: edits file)
    Column("n_contexts", Integer, nullable=False),
    Column("n_controls", Integer, nullable=False),
    Column("seed", Integer, nullable=False),
    Column("topk", Integer),  # None: JSD exact over the vocabulary
    Column("forward_passes", BigInteger),
    Column("created_at", DateTime, default=utcnow, nullable=False),
    *run_state_columns(),
)


# One step of a robustness run: IR, IR_norm with its CI, the controls, and the per-seed responses across seeds.
robustness_result = Table(
    "robustness_result",
    metadata,
    Column("run_id", ForeignKey("robustness_run.id", ondelete="CASCADE"), primary_key=True),
    Column("step", BigInteger, primary_key=True),
    Column("n_contexts", Integer, nullable=False),  # contexts the means and the bootstrap rest on
    Column("n_targets", BigInteger, nullable=False),  # evaluated positions (Fleiss' kappa's subjects)
    Column("n_neurons", Text),  # JSON: each seed's ablated set size (ablations)
    Column("ir_clean", Float),
    Column("ir_intervened", Float),
    Column("ir_norm", Float),
    Column("ir_norm_ci_low", Float),  # percentile bootstrap over contexts, 95 %
    Column("ir_norm_ci_high", Float),
    Column("n_controls", Integer, nullable=False),
    Column("control_mean", Float),
    Column("control_sd", Float),
    Column("excess", Float),  # ir_norm - control_mean
    Column("p_value", Float),  # two-sided rank p against the controls
    Column("p_floor", Float),  # 1 / (n_controls + 1)
    Column("kl_mean", Float),  # mean over seeds of KL(p_k(x) || p_k(x')) in bits
    Column("kl_sd", Float),  # between-seed sd
    Column("loss_change_mean", Float),
    Column("loss_change_sd", Float),
    Column("flip_rate_mean", Float),
    Column("flip_rate_sd", Float),
    Column("sign_agreement", Float),
    Column("fleiss_kappa", Float),
    Column("icc", Float),
    Column("per_seed", Text),  # JSON: per seed clean/intervened loss, KL, flip rate
)


# One control intervention of a robustness run at one step.
robustness_control = Table(
    "robustness_control",
    metadata,
    Column("run_id", ForeignKey("robustness_run.id", ondelete="CASCADE"), primary_key=True),
    Column("step", BigInteger, primary_key=True),
    Column("control", Integer, primary_key=True),
    Column("ir_norm", Float),
    Column("kl_mean", Float),
)

# Tables with at most one running row per request key: the database itself decides which of two identical
# concurrent requests computes (a partial unique index, on SQLite and PostgreSQL alike; created by the migrations).
RUNNING_UNIQUE = (
    "correlation_run",
    "persistence_run",
    "prediction_set",
    "ablation",
    "trajectory_run",
    "ingest_attempt",
    "concept_run",
    "robustness_run",
)


def declare_running_indexes() -> None:
    """Declare the partial unique indexes of `RUNNING_UNIQUE` on `metadata` (once), for writers and for comparing
    the declarations with the migrated database. Readers never need them, and declaring them costs SQLAlchemy a
    load of the SQLite and PostgreSQL dialects (about 0.1 s of every read command's start), hence not at import."""
    where = text("status = 'running'")
    for name in RUNNING_UNIQUE:
        table = metadata.tables[name]
        index = f"uq_{name}_running_request"
        if not any(i.name == index for i in table.indexes):
            Index(index, table.c.request_key, unique=True, sqlite_where=where, postgresql_where=where)
