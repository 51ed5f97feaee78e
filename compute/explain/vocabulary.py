"""Vocabulary statistics from the weights: how each MLP neuron's output row reads through the unembedding.

For neuron i of layer l with output row `w_out` (d_model), the direct logit effect per unit of activation is the
vocab-length vector `v = W_U^T diag(g) P w_out`, where

* `g` is the final norm's gain folded into the unembedding (TransformerLens `fold_ln`; Gemma's RMSNorm gain is
  `1 + weight`), and
* `P` subtracts the mean over d_model when the final norm is a LayerNorm (TransformerLens
  `center_writing_weights`): LayerNorm removes that component of the residual stream before the LM head, so it never
  reaches the logits. RMSNorm models (Llama, Mistral, Qwen, Gemma, ...) keep `w_out` as it is.

The unembedding is *not* centred over the vocabulary (TransformerLens `center_unembed`): that would only subtract
`mean` from every value of `v`, leaving variance, skew, kurtosis and the top/bottom token order unchanged, so the raw
values are kept and `mean` stays informative (subtract it to get the centred values). Bias terms (final-norm bias,
LM-head bias) add the same vector for every neuron and are left out. Gemma-2/3's final logit soft-capping is a
monotone squashing applied afterwards and is also left out: the statistics describe the linear logit effect.

`cosine=True` instead reproduces the statistic the paper's code summarises: the cosine between the
TransformerLens-processed `w_out` and each unembedding column (the unembedding folded, centred over d_model for
LayerNorm models, and centred over the vocabulary), i.e. `(v - mean(v)) / (|P w_out| * |column|)`.

The moments use the biased definitions of `scipy.stats` (`skew`, and `kurtosis` with `fisher=True`: excess kurtosis,
0 for a Gaussian). All statistics run over every row of the LM head, including padding rows some families add past
the tokenizer's vocabulary (Pythia), and are computed in float64, one block of neurons at a time, so memory stays at
about `4 * block * vocab` float64 values plus the folded unembedding (`d_model * vocab`).

Labelling rule (Gurnee et al. 2024, "Universal Neurons in GPT2 Language Models", TMLR 2024 / arXiv:2401.12181,
Section 5, the prediction-neuron analysis of the `W_U w_out` moments by layer): neurons whose vocabulary effect is
heavy-tailed (high kurtosis) and skewed up are *prediction* neurons (they boost a small set of tokens); heavy-tailed
and skewed down are *suppression* neurons. The numeric cut-off is taken from the authors' released code
(github.com/wesg52/universal-neurons, `analysis/prediction_neurons.py`; not checked against a number in the paper's
own text), whose figures split neurons at a kurtosis of 10 computed as the plain fourth standardised moment
(`utils.py` `vector_moments`, Gaussian = 3) of the cosine statistic. In the excess convention used here that is 7,
the default `VOCAB_KURTOSIS_MIN`; the sign of the skew (default `VOCAB_SKEW_MIN` 0) separates the two kinds.
Applying the same cut-off to the raw (non-cosine) statistic is our choice: kurtosis and skew are scale-free, but the
raw values weight tokens by their unembedding norm, so the two statistics differ somewhat.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from actdb.store.errors import ActdbError
from actdb.store.ingest.architectures import mlp_output_weights, unembedding

DEFAULT_TOP_K = 10
DEFAULT_BLOCK = 256
"""Neurons per block: GPT-2 small (vocab 50,257) then holds about 4 x 256 x 50,257 float64 values, ~0.4 GB."""

VOCAB_KURTOSIS_MIN = 7.0
"""Excess kurtosis above which a neuron's vocabulary effect counts as heavy-tailed (Pearson kurtosis 10, the split
in the released code of Gurnee et al. 2024; see the module docstring)."""
VOCAB_SKEW_MIN = 0.0
"""Skew above which a heavy-tailed neuron is a prediction neuron, and below minus which a suppression neuron."""
PREDICTION = "prediction"
SUPPRESSION = "suppression"
VOCAB_RULE = (
    f"{PREDICTION}: excess kurtosis of W_U w_out over the vocabulary > {VOCAB_KURTOSIS_MIN:g} and skew > "
    f"{VOCAB_SKEW_MIN:g}; {SUPPRESSION}: same kurtosis and skew < -{VOCAB_SKEW_MIN:g} (Gurnee et al. 2024, Sec. 5)"
)


@dataclass(frozen=True)
class VocabularyStats:
    """Per layer and neuron: moments of the neuron's logit effect over the vocabulary and its extreme tokens."""

    mean: np.ndarray
    """(n_layers, d_mlp) float64, and likewise `var`, `skew`, `kurtosis` (excess); skew and kurtosis are NaN where
    the variance is 0 (as in scipy), and every statistic is NaN for a zero output row under `cosine`."""
    var: np.ndarray
    skew: np.ndarray
    kurtosis: np.ndarray
    top_ids: np.ndarray
    """(n_layers, d_mlp, k) int64 token ids of the largest values, largest first (ties in no set order)."""
    top_values: np.ndarray
    """(n_layers, d_mlp, k) float64 values at `top_ids`."""
    bottom_ids: np.ndarray
    """(n_layers, d_mlp, k) int64 token ids of the smallest values, smallest first."""
    bottom_values: np.ndarray
    vocab_size: int
    """Rows of the LM head the statistics run over."""
    centered: bool
    """Whether `w_out` was centred over d_model (the final norm is a LayerNorm)."""
    cosine: bool
    """Whether the values are cosines (see the module docstring) rather than raw logit effects."""

    @property
    def shape(self) -> tuple[int, int]:
        """(n_layers, d_mlp)."""
        return self.mean.shape

    def labels(self, kurtosis_min: float = VOCAB_KURTOSIS_MIN, skew_min: float = VOCAB_SKEW_MIN) -> np.ndarray:
        """`vocab_labels` of these statistics."""
        return vocab_labels(self.skew, self.kurtosis, kurtosis_min=kurtosis_min, skew_min=skew_min)


def _compute_device(device: torch.device | str | None, default: torch.device) -> torch.device:
    dev = torch.device(device) if device is not None else default
    return torch.device("cpu") if dev.type == "mps" else dev  # MPS has no float64


@torch.no_grad()
def vocabulary_statistics(
    model: torch.nn.Module,
    top_k: int = DEFAULT_TOP_K,
    block: int = DEFAULT_BLOCK,
    *,
    cosine: bool = False,
    device: torch.device | str | None = None,
) -> VocabularyStats:
    """Moments and top/bottom-k tokens of every MLP neuron's direct logit effect `W_U^T diag(g) P w_out`, from the
    weights alone (no data), in float64 blocks of `block` neurons on `device` (default: the LM head's)."""
    if top_k < 0:
        raise ActdbError(f"top_k must be >= 0, not {top_k}")
    if block < 1:
        raise ActdbError(f"block must be >= 1, not {block}")
    outs = mlp_output_weights(model)
    head = unembedding(model)
    dev = _compute_device(device, head.weight.device)
    U = head.weight.to(dev, torch.float64)  # (d_model, vocab)
    d_model, vocab = U.shape
    if outs and outs[0].shape[1] != d_model:
        raise ActdbError(f"MLP output rows have d_model={outs[0].shape[1]}, the LM head reads {d_model}")
    if head.norm_scale is not None:
        U = U * head.norm_scale.to(dev, torch.float64)[:, None]
    col_norm = None
    if cosine:  # column norms of the TransformerLens-processed unembedding
        Uc = U - U.mean(0, keepdim=True) if head.norm_centers else U.clone()
        Uc -= Uc.mean(1, keepdim=True)
        col_norm = Uc.norm(dim=0)
        del Uc
    k = min(top_k, vocab)
    n_layers, d_mlp = len(outs), (outs[0].shape[0] if outs else 0)
    moments = np.full((4, n_layers, d_mlp), np.nan)
    ids = np.zeros((2, n_layers, d_mlp, k), dtype=np.int64)
    values = np.zeros((2, n_layers, d_mlp, k))
    for layer, W in enumerate(outs):
        for start in range(0, d_mlp, block):
            stop = min(start + block, d_mlp)
            w = W[start:stop].to(dev, torch.float64)
            if head.norm_centers:
                w = w - w.mean(1, keepdim=True)
            v = w @ U  # (b, vocab)
            if cosine:
                v -= v.mean(1, keepdim=True)
                v /= w.norm(dim=1, keepdim=True) * col_norm[None, :]
            m, var, skew, kurt = _moments(v)
            sl = (layer, slice(start, stop))
            for i, stat in enumerate((m, var, skew, kurt)):
                moments[(i, *sl)] = stat.cpu().numpy()
            if k:
                for j, largest in enumerate((True, False)):
                    val, ix = torch.topk(v, k, dim=1, largest=largest, sorted=True)
                    ids[(j, *sl)] = ix.cpu().numpy()
                    values[(j, *sl)] = val.cpu().numpy()
            del v, w
    return VocabularyStats(
        mean=moments[0],
        var=moments[1],
        skew=moments[2],
        kurtosis=moments[3],
        top_ids=ids[0],
        top_values=values[0],
        bottom_ids=ids[1],
        bottom_values=values[1],
        vocab_size=int(vocab),
        centered=head.norm_centers,
        cosine=cosine,
    )


def _moments(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row-wise mean, variance, skew and excess kurtosis with scipy.stats' biased (population) definitions."""
    mean = v.mean(1)
    d = v - mean[:, None]
    d2 = d * d
    m2 = d2.mean(1)
    m3 = (d2 * d).mean(1)
    d2 *= d2
    m4 = d2.mean(1)
    zero = m2 == 0  # a zero or constant row: scipy gives NaN
    m2 = torch.where(zero, torch.nan, m2)
    skew = m3 / m2**1.5
    kurt = m4 / m2**2 - 3.0
    return mean, torch.where(zero, 0.0, m2), skew, kurt


def vocab_labels(
    skew: np.ndarray,
    kurtosis: np.ndarray,
    kurtosis_min: float = VOCAB_KURTOSIS_MIN,
    skew_min: float = VOCAB_SKEW_MIN,
) -> np.ndarray:
    """Label each neuron `PREDICTION` (excess kurtosis > kurtosis_min, skew > skew_min), `SUPPRESSION` (as heavy,
    skew < -skew_min) or "" (NaN never labels): the weight-based roles of Gurnee et al. 2024, Sec. 5."""
    if not skew_min >= 0:
        raise ActdbError(f"skew_min must be >= 0 (it bounds both signs), not {skew_min}")
    skew_arr, kurt_arr = np.broadcast_arrays(np.asarray(skew, dtype=np.float64), np.asarray(kurtosis, np.float64))
    heavy = kurt_arr > kurtosis_min
    out = np.full(skew_arr.shape, "", dtype=f"<U{max(len(PREDICTION), len(SUPPRESSION))}")
    out[heavy & (skew_arr > skew_min)] = PREDICTION
    out[heavy & (skew_arr < -skew_min)] = SUPPRESSION
    return out
