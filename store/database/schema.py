"""ORM classes of the store's tables, mapped imperatively onto the Core tables of `store.database.tables`.

Only writers import this module (ingest, the runs of the compute studies, migrations' tests); readers select from
the Core tables and never pay for the ORM."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import registry, relationship

from actdb.store.database import tables

mapper_registry = registry(metadata=tables.metadata)
tables.declare_running_indexes()  # writers' metadata is the whole schema


class MappedRow:
    """Keyword construction for mapped classes, as declarative classes have it: `Model(name=..., ...)`."""

    def __init__(self, **values: Any) -> None:
        for key, value in values.items():
            setattr(self, key, value)


class Model(MappedRow):
    """One independently trained model (a seed); its checkpoints share architecture and width."""


class Checkpoint(MappedRow):
    """A model at one training step, loaded from `source` at `revision`; `weights_sha256` fingerprints the
    weights that were loaded, so another step's or another model's weights are never stored under this name.
    """


class Dataset(MappedRow):
    """A token dataset shared by every model: packed sequences plus the mask of counted positions."""


class ActivationSet(MappedRow):
    """One checkpoint's activations on one dataset at one hook: an HDF5 file and its ingest state."""


class NeuronStat(MappedRow):
    """Moments of one neuron's activation over a dataset's counted positions."""


class SetExplanation(MappedRow):
    """A set's explanation file (examples, token/position fractions, vocabulary statistics) and the thresholds
    its neuron families use; see `actdb.compute.explain.run`.
    """


class NeuronExplanation(MappedRow):
    """Per neuron: variance fractions explained by token id and position, the top token by mean activation,
    and the vocabulary moments of its output weights through the unembedding.
    """


class CorrelationRun(MappedRow):
    """One request to correlate a list of activation sets on one dataset, and its outcome.

    `kind` is `cross_model` when every member is a different model (its universality scores are the ones
    listings and ablations use) and `within_model` when a model appears at several steps (persistence).
    `threshold` is not part of the request: it is the default for displaying labels (`excess_corr > threshold`),
    which every reader may override.
    """


class RunMember(MappedRow):
    """An activation set taking part in a correlation run."""


class NeuronMatch(MappedRow):
    """A neuron's best match among all neurons of another set, and the same under a random rotation."""


class Universality(MappedRow):
    """How much a neuron's best match in the other sets beats the rotation baseline; universal when
    `excess_corr > threshold`, evaluated where it is read (`store.database.labels`).
    """


class PersistenceRun(MappedRow):
    """One request to compute persistence of a model's universal neurons across analysed steps."""


class PredictionSet(MappedRow):
    """A checkpoint's top-1 predictions and per-token losses on a dataset (`actdb predictions`), in an HDF5 file
    beside its activations.
    """


class LayerSimilarity(MappedRow):
    """How alike one layer of a set is to one layer of another set (or itself) in a similarity run: mean best
    correlation of its neurons there (and against rotated copies: mean and sd over draws), the one-to-one
    matched correlation (same-index layers only) and linear CKA.
    """


class Persistence(MappedRow):
    """How many of one layer's universal neurons (excess > threshold) at `from_step` are still universal at
    `to_step`.
    """


class NeuronEmergence(MappedRow):
    """The first analysed step from which a neuron stays universal (NULL: not universal at the last step)."""


class Ablation(MappedRow):
    """Cross-entropy of a checkpoint with chosen neurons replaced, against the clean run and random controls.

    `threshold` is the excess correlation that chose the neurons when the selector was `universal`.
    """


class AblationNeuron(MappedRow):
    """One neuron ablated on its own (`actdb ablate --each`)."""


class TrajectoryRun(MappedRow):
    """One `actdb trajectories` request: every checkpoint of `sets` against every other on a dataset's stored
    predictions (and weights), with the map's distance and embedding and the run-level counts."""


class TrajectoryValue(MappedRow):
    """One measure of one ordered pair of checkpoints in a trajectory run (long format)."""


class TrajectoryPoint(MappedRow):
    """One checkpoint of a trajectory run: top-1 accuracy, mean loss, Bradley-Terry strength, map coordinates."""


class IngestAttempt(MappedRow):
    """A forced redo of a complete activation set (`ingest --force`): its lifecycle lives here, not in the set's
    status, so the set stays complete (and readable) until its replacement is; a failed redo is a failed attempt
    with its error, and the set keeps its file, statistics and status."""


class StoreIdentity(MappedRow):
    """The one row binding a database to its store folder: the same id is kept in the folder's `actdb-store-id`
    file, so a second store initialised on this database (another folder) is refused."""


class ConceptSet(MappedRow):
    """A named concepts file (`actdb concept add`): its canonical JSONL and fingerprint."""


class ConceptRun(MappedRow):
    """Expert neurons of one activation set's checkpoint for a concept set (`actdb concept run`): AP arrays in
    an HDF5 sidecar beside the set's activations, top-k experts and summaries in SQL."""


class ConceptScore(MappedRow):
    """One concept's summary in a concept run: best AP and AUROC, the permutation null, experts above tau."""


class ConceptExpert(MappedRow):
    """One of a concept's top-k neurons by AP in a concept run."""


class ConceptAlignment(MappedRow):
    """RSA of a concept run's concept x concept similarity with a reference (the taxonomy, or a human file)."""


mapper_registry.map_imperatively(
    Model, tables.model, properties={"checkpoints": relationship(Checkpoint, back_populates="model")}
)
mapper_registry.map_imperatively(
    Checkpoint, tables.checkpoint, properties={"model": relationship(Model, back_populates="checkpoints")}
)
mapper_registry.map_imperatively(Dataset, tables.dataset)
mapper_registry.map_imperatively(
    ActivationSet,
    tables.activation_set,
    properties={"checkpoint": relationship(Checkpoint), "dataset": relationship(Dataset)},
)
mapper_registry.map_imperatively(NeuronStat, tables.neuron_stat)
mapper_registry.map_imperatively(SetExplanation, tables.set_explanation)
mapper_registry.map_imperatively(NeuronExplanation, tables.neuron_explanation)
mapper_registry.map_imperatively(CorrelationRun, tables.correlation_run)
mapper_registry.map_imperatively(RunMember, tables.run_member)
mapper_registry.map_imperatively(NeuronMatch, tables.neuron_match)
mapper_registry.map_imperatively(Universality, tables.universality)
mapper_registry.map_imperatively(PersistenceRun, tables.persistence_run)
mapper_registry.map_imperatively(PredictionSet, tables.prediction_set)
mapper_registry.map_imperatively(LayerSimilarity, tables.layer_similarity)
mapper_registry.map_imperatively(Persistence, tables.persistence)
mapper_registry.map_imperatively(NeuronEmergence, tables.neuron_emergence)
mapper_registry.map_imperatively(Ablation, tables.ablation)
mapper_registry.map_imperatively(AblationNeuron, tables.ablation_neuron)
mapper_registry.map_imperatively(TrajectoryRun, tables.trajectory_run)
mapper_registry.map_imperatively(TrajectoryValue, tables.trajectory_value)
mapper_registry.map_imperatively(TrajectoryPoint, tables.trajectory_point)
mapper_registry.map_imperatively(IngestAttempt, tables.ingest_attempt)
mapper_registry.map_imperatively(StoreIdentity, tables.store_identity)
mapper_registry.map_imperatively(ConceptSet, tables.concept_set)
mapper_registry.map_imperatively(ConceptRun, tables.concept_run)
mapper_registry.map_imperatively(ConceptScore, tables.concept_score)
mapper_registry.map_imperatively(ConceptExpert, tables.concept_expert)
mapper_registry.map_imperatively(ConceptAlignment, tables.concept_alignment)
