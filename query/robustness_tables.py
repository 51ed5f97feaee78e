"""Tables of stored robustness runs (`v_robustness_by_step`, `v_robustness_controls`): per step, the
intervention's IR_norm with its CI beside the controls, and the controls themselves. The table names the dataset
the contexts came from and each seed's ablated set size: IR_norm of sets of different sizes is not one effect."""

from __future__ import annotations

from sqlalchemy import select

from actdb.store.database.connection import Rows, Store
from actdb.store.database.views import v_robustness_by_step, v_robustness_controls

SHOW_COLUMNS = (
    "run_id",
    "intervention",
    "spec",
    "eval_dataset",
    "step",
    "n_contexts",
    "n_neurons",
    "ir_clean",
    "ir_intervened",
    "ir_norm",
    "ir_norm_ci_low",
    "ir_norm_ci_high",
    "n_controls",
    "control_mean",
    "control_sd",
    "excess",
    "p_value",
    "p_floor",
    "kl_mean",
    "kl_sd",
    "flip_rate_mean",
    "sign_agreement",
    "fleiss_kappa",
    "icc",
)


def robustness_by_step(
    store: Store, run: int | None = None, intervention: str | None = None, wide: bool = False
) -> Rows:
    """Complete runs' results per step (one run, or every run of one intervention kind), oldest run first."""
    v = v_robustness_by_step
    columns = list(v.c) if wide else [v.c[name] for name in SHOW_COLUMNS]
    query = select(*columns).order_by(v.c.run_id, v.c.step)
    if run is not None:
        query = query.where(v.c.run_id == run)
    if intervention is not None:
        query = query.where(v.c.intervention == intervention)
    return store.query(query)


def robustness_controls(store: Store, run: int | None = None) -> Rows:
    """Each control's IR_norm and mean KL per step (complete runs)."""
    v = v_robustness_controls
    query = select(v).order_by(v.c.run_id, v.c.step, v.c.control)
    if run is not None:
        query = query.where(v.c.run_id == run)
    return store.query(query)
