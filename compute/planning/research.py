"""The research method's cost for the same study on the same hardware, so that `actdb plan` can show actdb's
estimate beside it: Gurnee et al. (2024), github.com/wesg52/universal-neurons, `correlations_fast.py`.

Its operations, as that code runs them: one job per (pair of models, step) and per kind (the correlation, and
the rotation baseline as a second full job); each job runs both models' forward passes again over every token
batch (activations are recomputed, not read), multiplies every layer pair's float32 activations
(`StreamingPearsonComputer.update_correlation_data`: torch's default float32 matmul, no TF32) and adds each
batch's products into float64 sums; the baseline job first rotates the second model's activations layer by
layer (a float32 d x d product per token). Jobs are independent, so W workers run ceil(jobs / W) rounds.
Counted at the same rates as actdb's estimate: its best case (sums and sums of squares, and moving products to
the host, are left out).
"""

from __future__ import annotations

from dataclasses import dataclass

from actdb.compute.planning.rates import Rates
from actdb.compute.planning.shapes import PlanRequest

RESEARCH_BATCH_TOKENS = 32 * 512  # its default --batch_size 32 sequences of 512 tokens


@dataclass(frozen=True)
class ResearchEstimate:
    """Seconds of the research method's jobs for a study, and what one job spends them on."""

    jobs: int  # (pair of models, step) x {correlation, baseline}
    rounds: int  # jobs in a row on each worker: ceil(jobs / workers)
    forward: float  # one job's two forward passes
    products: float  # one job's float32 layer-pair products
    adds: float  # one job's float64 additions of each batch's products
    rotation: float  # the baseline job's rotation of the second model's activations

    @property
    def job(self) -> float:
        """A correlation and a baseline job on average."""
        return self.forward + self.products + self.adds + self.rotation / 2

    @property
    def total(self) -> float:
        return self.rounds * self.job


def research_estimate(request: PlanRequest, rates: Rates) -> ResearchEstimate:
    """The research method's time for `request` at `rates`: float32 products at the device's plain float32 rate
    (a GPU's `rates.baseline`, which TF32 does not speed up; on the CPU the same chunk-shaped float32 products as
    actdb's), forward passes at the forward rate, float64 additions at the accumulators' rate."""
    arch, t = request.arch, request.tokens
    float32 = rates.products if request.device == "cpu" else rates.baseline
    n = arch.n_neurons
    jobs = 2 * request.steps * request.models * (request.models - 1) // 2
    batches = -(-t // RESEARCH_BATCH_TOKENS)
    return ResearchEstimate(
        jobs=jobs,
        rounds=-(-jobs // request.workers),
        forward=2 * 2 * arch.params * t / rates.forward,
        products=2 * n * n * t / float32,
        adds=batches * n * n / rates.adds,
        rotation=arch.n_layers * 2 * arch.d_mlp**2 * t / float32,
    )
