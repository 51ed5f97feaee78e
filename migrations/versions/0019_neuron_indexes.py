"""Indexes for reading one neuron: `neuron_match (set_id, layer, neuron)` (its matches: its page in `actdb serve`,
`actdb neuron`, its self-correlation over steps) and `concept_expert (layer, neuron)` (the concepts it is an expert
for). Both tables' primary keys start elsewhere (`run_id`), so those reads scanned every row (12 ms and 5 ms of a
57 ms neuron page on the demo store, growing with the store); with the indexes they are searches.

Revision ID: 0019
Revises: 0018
"""

from alembic import op

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_neuron_match_set_neuron", "neuron_match", ["set_id", "layer", "neuron"])
    op.create_index("ix_concept_expert_neuron", "concept_expert", ["layer", "neuron"])


def downgrade() -> None:
    op.drop_index("ix_concept_expert_neuron", table_name="concept_expert")
    op.drop_index("ix_neuron_match_set_neuron", table_name="neuron_match")
