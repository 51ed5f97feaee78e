"""SQLAlchemy models of the store's tables; the tables themselves are created only by Alembic revisions."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


DEFAULT_THRESHOLD = 0.5  # excess correlation above which a neuron is universal (Gurnee et al. 2024)


class RunState:
    """Lifecycle columns shared by every run table (`store.database.lifecycle`): claim -> running -> complete | failed,
    or `abandoned` when the owning process (host, pid) died or stopped sending heartbeats."""

    status: Mapped[str] = mapped_column(String(20), default="pending")
    host: Mapped[str | None] = mapped_column(String(255))
    pid: Mapped[int | None] = mapped_column(Integer)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime)
    started_at: Mapped[datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)
    seconds: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)


def running_unique(table: str) -> Index:
    """At most one running row per request key: the database itself decides which of two identical concurrent
    requests computes (a partial unique index, on SQLite and PostgreSQL alike)."""
    where = text("status = 'running'")
    return Index(f"uq_{table}_running_request", "request_key", unique=True, sqlite_where=where, postgresql_where=where)


class Model(Base):
    """One independently trained model (a seed); its checkpoints share architecture and width."""

    __tablename__ = "model"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    family: Mapped[str] = mapped_column(String(50))
    seed: Mapped[str | None] = mapped_column(String(50))
    architecture: Mapped[str] = mapped_column(String(50))
    n_layers: Mapped[int] = mapped_column(Integer)
    d_mlp: Mapped[int] = mapped_column(Integer)
    source: Mapped[str] = mapped_column(Text)
    revision_template: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    checkpoints: Mapped[list[Checkpoint]] = relationship(back_populates="model")


class Checkpoint(Base):
    """A model at one training step, loaded from `source` at `revision`; `weights_sha256` fingerprints the
    weights that were loaded, so another step's or another model's weights are never stored under this name."""

    __tablename__ = "checkpoint"
    __table_args__ = (UniqueConstraint("model_id", "step"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("model.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(BigInteger)
    source: Mapped[str] = mapped_column(Text)
    revision: Mapped[str | None] = mapped_column(String(200))
    source_sha: Mapped[str | None] = mapped_column(String(100))
    weights_sha256: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    model: Mapped[Model] = relationship(back_populates="checkpoints")


class Dataset(Base):
    """A token dataset shared by every model: packed sequences plus the mask of counted positions."""

    __tablename__ = "dataset"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    tokenizer: Mapped[str] = mapped_column(Text)
    tokenizer_fingerprint: Mapped[str] = mapped_column(String(64))
    vocab_size: Mapped[int] = mapped_column(Integer)
    seq_len: Mapped[int] = mapped_column(Integer)
    n_sequences: Mapped[int] = mapped_column(Integer)
    n_tokens: Mapped[int] = mapped_column(BigInteger)
    n_counted: Mapped[int] = mapped_column(BigInteger)
    token_sha256: Mapped[str] = mapped_column(String(64))
    excluded_tokens: Mapped[str] = mapped_column(Text, default="[]")  # JSON list of token ids that never count
    fingerprint: Mapped[str] = mapped_column(String(64))  # token ids + exclusions; what activation files name
    source: Mapped[str] = mapped_column(Text)
    seed: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)  # relative to the store folder
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class ActivationSet(RunState, Base):
    """One checkpoint's activations on one dataset at one hook: an HDF5 file and its ingest state."""

    __tablename__ = "activation_set"
    __table_args__ = (UniqueConstraint("checkpoint_id", "dataset_id", "hook"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    checkpoint_id: Mapped[int] = mapped_column(ForeignKey("checkpoint.id", ondelete="CASCADE"))
    dataset_id: Mapped[int] = mapped_column(ForeignKey("dataset.id", ondelete="CASCADE"))
    hook: Mapped[str] = mapped_column(String(50))
    dtype: Mapped[str] = mapped_column(String(20))
    path: Mapped[str] = mapped_column(Text)  # relative to the store folder
    tokens_done: Mapped[int] = mapped_column(BigInteger, default=0)
    n_tokens: Mapped[int] = mapped_column(BigInteger)
    bytes: Mapped[int | None] = mapped_column(BigInteger)
    checkpoint: Mapped[Checkpoint] = relationship()
    dataset: Mapped[Dataset] = relationship()


class NeuronStat(Base):
    """Moments of one neuron's activation over a dataset's counted positions."""

    __tablename__ = "neuron_stat"
    set_id: Mapped[int] = mapped_column(ForeignKey("activation_set.id", ondelete="CASCADE"), primary_key=True)
    layer: Mapped[int] = mapped_column(Integer, primary_key=True)
    neuron: Mapped[int] = mapped_column(Integer, primary_key=True)
    count: Mapped[int] = mapped_column(BigInteger)
    mean: Mapped[float] = mapped_column(Float)
    std: Mapped[float] = mapped_column(Float)
    skew: Mapped[float | None] = mapped_column(Float)
    kurtosis: Mapped[float | None] = mapped_column(Float)
    frac_active: Mapped[float] = mapped_column(Float)
    min: Mapped[float] = mapped_column(Float)
    max: Mapped[float] = mapped_column(Float)


class SetExplanation(Base):
    """A set's explanation file (examples, token/position fractions, vocabulary statistics) and the thresholds
    its neuron families use; see `actdb.compute.explain.run`."""

    __tablename__ = "set_explanation"
    set_id: Mapped[int] = mapped_column(ForeignKey("activation_set.id", ondelete="CASCADE"), primary_key=True)
    path: Mapped[str] = mapped_column(Text)
    top_k: Mapped[int] = mapped_column(Integer)
    min_count: Mapped[int] = mapped_column(Integer)
    n_tokens: Mapped[int] = mapped_column(BigInteger)
    n_token_ids: Mapped[int] = mapped_column(Integer)
    n_positions: Mapped[int] = mapped_column(Integer)
    token_min_r2: Mapped[float] = mapped_column(Float)
    position_min_r2: Mapped[float] = mapped_column(Float)
    vocab_kurtosis_min: Mapped[float | None] = mapped_column(Float)
    vocab_skew_min: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime | None] = mapped_column(DateTime, default=utcnow)


class NeuronExplanation(Base):
    """Per neuron: variance fractions explained by token id and position, the top token by mean activation,
    and the vocabulary moments of its output weights through the unembedding."""

    __tablename__ = "neuron_explanation"
    set_id: Mapped[int] = mapped_column(ForeignKey("activation_set.id", ondelete="CASCADE"), primary_key=True)
    layer: Mapped[int] = mapped_column(Integer, primary_key=True)
    neuron: Mapped[int] = mapped_column(Integer, primary_key=True)
    max_activation: Mapped[float | None] = mapped_column(Float)
    token_r2: Mapped[float | None] = mapped_column(Float)
    position_r2: Mapped[float | None] = mapped_column(Float)
    top_token: Mapped[int | None] = mapped_column(Integer)
    top_token_mean: Mapped[float | None] = mapped_column(Float)
    top_token_count: Mapped[int | None] = mapped_column(Integer)
    vocab_mean: Mapped[float | None] = mapped_column(Float)
    vocab_var: Mapped[float | None] = mapped_column(Float)
    vocab_skew: Mapped[float | None] = mapped_column(Float)
    vocab_kurtosis: Mapped[float | None] = mapped_column(Float)
    vocab_label: Mapped[str | None] = mapped_column(String(20))


class CorrelationRun(RunState, Base):
    """One request to correlate a list of activation sets on one dataset, and its outcome.

    `kind` is `cross_model` when every member is a different model (its universality scores are the ones
    listings and ablations use) and `within_model` when a model appears at several steps (persistence).
    `threshold` is not part of the request: it is the default for displaying labels (`excess_corr > threshold`),
    which every reader may override.
    """

    __tablename__ = "correlation_run"
    __table_args__ = (running_unique("correlation_run"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    request_key: Mapped[str] = mapped_column(String(64), index=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("dataset.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(20))
    control: Mapped[str] = mapped_column(String(20))
    threshold: Mapped[float] = mapped_column(Float)
    baseline_seed: Mapped[int] = mapped_column(Integer)
    baseline_draws: Mapped[int] = mapped_column(Integer, default=1)
    topk: Mapped[int] = mapped_column(Integer)
    backend: Mapped[str] = mapped_column(String(20))
    n_tokens: Mapped[int | None] = mapped_column(BigInteger)
    n_passes: Mapped[int | None] = mapped_column(Integer)
    n_dead: Mapped[int | None] = mapped_column(Integer)


class RunMember(Base):
    """An activation set taking part in a correlation run."""

    __tablename__ = "run_member"
    run_id: Mapped[int] = mapped_column(ForeignKey("correlation_run.id", ondelete="CASCADE"), primary_key=True)
    set_id: Mapped[int] = mapped_column(ForeignKey("activation_set.id", ondelete="CASCADE"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer)


class NeuronMatch(Base):
    """A neuron's best match among all neurons of another set, and the same under a random rotation."""

    __tablename__ = "neuron_match"
    run_id: Mapped[int] = mapped_column(ForeignKey("correlation_run.id", ondelete="CASCADE"), primary_key=True)
    set_id: Mapped[int] = mapped_column(ForeignKey("activation_set.id", ondelete="CASCADE"), primary_key=True)
    other_set_id: Mapped[int] = mapped_column(ForeignKey("activation_set.id", ondelete="CASCADE"), primary_key=True)
    layer: Mapped[int] = mapped_column(Integer, primary_key=True)
    neuron: Mapped[int] = mapped_column(Integer, primary_key=True)
    max_corr: Mapped[float | None] = mapped_column(Float)
    best_layer: Mapped[int | None] = mapped_column(Integer)
    best_neuron: Mapped[int | None] = mapped_column(Integer)
    baseline_max_corr: Mapped[float | None] = mapped_column(Float)  # mean over baseline draws
    baseline_sd: Mapped[float | None] = mapped_column(Float)  # sd over baseline draws
    topk: Mapped[str | None] = mapped_column(Text)
    self_corr: Mapped[float | None] = mapped_column(Float)


class Universality(Base):
    """How much a neuron's best match in the other sets beats the rotation baseline; universal when
    `excess_corr > threshold`, evaluated where it is read (`store.database.labels`)."""

    __tablename__ = "universality"
    __table_args__ = (Index("ix_universality_set_layer", "set_id", "layer"),)
    run_id: Mapped[int] = mapped_column(ForeignKey("correlation_run.id", ondelete="CASCADE"), primary_key=True)
    set_id: Mapped[int] = mapped_column(ForeignKey("activation_set.id", ondelete="CASCADE"), primary_key=True)
    layer: Mapped[int] = mapped_column(Integer, primary_key=True)
    neuron: Mapped[int] = mapped_column(Integer, primary_key=True)
    mean_max_corr: Mapped[float | None] = mapped_column(Float)
    min_max_corr: Mapped[float | None] = mapped_column(Float)
    mean_baseline: Mapped[float | None] = mapped_column(Float)
    baseline_sd: Mapped[float | None] = mapped_column(Float)
    excess_corr: Mapped[float | None] = mapped_column(Float)
    z: Mapped[float | None] = mapped_column(Float)  # excess / this neuron's own baseline sd (rests on n_draws)
    z_pooled: Mapped[float | None] = mapped_column(Float)  # excess / the layer-pooled, shrunk baseline sd
    n_draws: Mapped[int | None] = mapped_column(Integer)  # baseline draws its scores rest on (NULL: the run's)
    stability: Mapped[float | None] = mapped_column(Float)  # share of draws universal at the run's threshold
    excess_draws: Mapped[str | None] = mapped_column(Text)  # the excess against each draw, sorted, comma-separated
    is_dead: Mapped[bool] = mapped_column(Boolean)


class PersistenceRun(RunState, Base):
    """One request to compute persistence of a model's universal neurons across analysed steps."""

    __tablename__ = "persistence_run"
    __table_args__ = (running_unique("persistence_run"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    request_key: Mapped[str] = mapped_column(String(64), index=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("model.id", ondelete="CASCADE"))
    dataset_id: Mapped[int] = mapped_column(ForeignKey("dataset.id", ondelete="CASCADE"))
    control: Mapped[str] = mapped_column(String(20))
    threshold: Mapped[float] = mapped_column(Float)
    steps: Mapped[str] = mapped_column(Text)


class PredictionSet(RunState, Base):
    """A checkpoint's top-1 predictions and per-token losses on a dataset (`actdb predictions`), in an HDF5 file
    beside its activations."""

    __tablename__ = "prediction_set"
    __table_args__ = (running_unique("prediction_set"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    request_key: Mapped[str] = mapped_column(String(64), index=True)
    checkpoint_id: Mapped[int] = mapped_column(ForeignKey("checkpoint.id", ondelete="CASCADE"))
    dataset_id: Mapped[int] = mapped_column(ForeignKey("dataset.id", ondelete="CASCADE"))
    path: Mapped[str] = mapped_column(Text)  # relative to the store folder
    n_tokens: Mapped[int | None] = mapped_column(BigInteger)
    mean_loss: Mapped[float | None] = mapped_column(Float)


class LayerSimilarity(Base):
    """How alike one layer of a set is to one layer of another set (or itself) in a similarity run: mean best
    correlation of its neurons there (and against rotated copies: mean and sd over draws), the one-to-one
    matched correlation (same-index layers only) and linear CKA."""

    __tablename__ = "layer_similarity"
    run_id: Mapped[int] = mapped_column(ForeignKey("correlation_run.id", ondelete="CASCADE"), primary_key=True)
    set_id: Mapped[int] = mapped_column(ForeignKey("activation_set.id", ondelete="CASCADE"), primary_key=True)
    other_set_id: Mapped[int] = mapped_column(ForeignKey("activation_set.id", ondelete="CASCADE"), primary_key=True)
    layer: Mapped[int] = mapped_column(Integer, primary_key=True)
    other_layer: Mapped[int] = mapped_column(Integer, primary_key=True)
    mean_max_corr: Mapped[float | None] = mapped_column(Float)
    mean_baseline: Mapped[float | None] = mapped_column(Float)
    baseline_sd: Mapped[float | None] = mapped_column(Float)
    matched_corr: Mapped[float | None] = mapped_column(Float)
    cka: Mapped[float | None] = mapped_column(Float)


class Persistence(Base):
    """How many of one layer's universal neurons (excess > threshold) at `from_step` are still universal at
    `to_step`."""

    __tablename__ = "persistence"
    __table_args__ = (
        UniqueConstraint(
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
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("model.id", ondelete="CASCADE"))
    dataset_id: Mapped[int] = mapped_column(ForeignKey("dataset.id", ondelete="CASCADE"))
    control: Mapped[str] = mapped_column(String(20))
    threshold: Mapped[float] = mapped_column(Float)
    from_step: Mapped[int] = mapped_column(BigInteger)
    to_step: Mapped[int] = mapped_column(BigInteger)
    layer: Mapped[int] = mapped_column(Integer)
    n_universal_from: Mapped[int] = mapped_column(Integer)
    n_universal_to: Mapped[int] = mapped_column(Integer)
    n_kept: Mapped[int] = mapped_column(Integer)
    p_persist: Mapped[float | None] = mapped_column(Float)
    jaccard: Mapped[float | None] = mapped_column(Float)
    mean_self_corr: Mapped[float | None] = mapped_column(Float)  # over every neuron of the layer
    mean_self_corr_universal: Mapped[float | None] = mapped_column(Float)  # over those universal at from_step
    from_run_id: Mapped[int] = mapped_column(ForeignKey("correlation_run.id", ondelete="CASCADE"))
    to_run_id: Mapped[int] = mapped_column(ForeignKey("correlation_run.id", ondelete="CASCADE"))
    self_run_id: Mapped[int] = mapped_column(ForeignKey("correlation_run.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class NeuronEmergence(Base):
    """The first analysed step from which a neuron stays universal (NULL: not universal at the last step)."""

    __tablename__ = "neuron_emergence"
    model_id: Mapped[int] = mapped_column(ForeignKey("model.id", ondelete="CASCADE"), primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("dataset.id", ondelete="CASCADE"), primary_key=True)
    control: Mapped[str] = mapped_column(String(20), primary_key=True)
    threshold: Mapped[float] = mapped_column(Float, primary_key=True)
    layer: Mapped[int] = mapped_column(Integer, primary_key=True)
    neuron: Mapped[int] = mapped_column(Integer, primary_key=True)
    emergence_step: Mapped[int | None] = mapped_column(BigInteger)
    steps: Mapped[str] = mapped_column(Text)


class Ablation(RunState, Base):
    """Cross-entropy of a checkpoint with chosen neurons replaced, against the clean run and random controls.

    `threshold` is the excess correlation that chose the neurons when the selector was `universal`."""

    __tablename__ = "ablation"
    __table_args__ = (running_unique("ablation"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    request_key: Mapped[str | None] = mapped_column(String(64), index=True)
    checkpoint_id: Mapped[int] = mapped_column(ForeignKey("checkpoint.id", ondelete="CASCADE"))
    dataset_id: Mapped[int] = mapped_column(ForeignKey("dataset.id", ondelete="CASCADE"))
    run_id: Mapped[int | None] = mapped_column(ForeignKey("correlation_run.id", ondelete="SET NULL"))
    method: Mapped[str] = mapped_column(String(20))
    selector: Mapped[str] = mapped_column(Text)
    threshold: Mapped[float | None] = mapped_column(Float)
    neurons: Mapped[str] = mapped_column(Text)
    n_neurons: Mapped[int] = mapped_column(Integer)
    tokens: Mapped[int] = mapped_column(BigInteger)
    seed: Mapped[int] = mapped_column(Integer)
    base_loss: Mapped[float | None] = mapped_column(Float)
    ablated_loss: Mapped[float | None] = mapped_column(Float)
    delta: Mapped[float | None] = mapped_column(Float)
    n_controls: Mapped[int] = mapped_column(Integer)
    control_mean: Mapped[float | None] = mapped_column(Float)
    control_std: Mapped[float | None] = mapped_column(Float)
    control_ci_low: Mapped[float | None] = mapped_column(Float)
    control_ci_high: Mapped[float | None] = mapped_column(Float)
    control_min: Mapped[float | None] = mapped_column(Float)
    control_max: Mapped[float | None] = mapped_column(Float)
    control_deltas: Mapped[str | None] = mapped_column(Text)  # JSON list, one delta per control set
    p_value: Mapped[float | None] = mapped_column(Float)
    each: Mapped[bool] = mapped_column(Boolean)
    eval_split: Mapped[str] = mapped_column(String(20))  # held_out | in_sample | listed
    eval_sequences: Mapped[str | None] = mapped_column(Text)  # measured sequences of `dataset_id`, as ranges
    n_eval_sequences: Mapped[int | None] = mapped_column(Integer)
    positions: Mapped[str] = mapped_column(String(20))  # counted | all: where activations are replaced
    selection_dataset_id: Mapped[int | None] = mapped_column(
        ForeignKey("dataset.id", ondelete="SET NULL", name="fk_ablation_selection_dataset")
    )
    forward_passes: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class AblationNeuron(Base):
    """One neuron ablated on its own (`actdb ablate --each`)."""

    __tablename__ = "ablation_neuron"
    ablation_id: Mapped[int] = mapped_column(ForeignKey("ablation.id", ondelete="CASCADE"), primary_key=True)
    layer: Mapped[int] = mapped_column(Integer, primary_key=True)
    neuron: Mapped[int] = mapped_column(Integer, primary_key=True)
    ablated_loss: Mapped[float] = mapped_column(Float)
    delta: Mapped[float] = mapped_column(Float)
