"""Pure maths of low-rank factorization and RobustDLRT (no modules, no state).

- initial factors: reduced or randomized SVD, HOSVD of the channel modes of a conv kernel
- basis augmentation: Û = [U | orth(G ⟂ U)] (paper Appendix A, eq. 7)
- truncation rank by relative tolerance τ, one vectorized pass
- the spectral regularizer R (paper Definition 1) with its closed-form gradient (Prop. 1a)
- condition numbers, mode products for Tucker cores
"""

from .augmentation import augment_basis, orthonormal_complement, regularizing_noise
from .conditioning import condition_number
from .orthonormal import orthonormal_columns, qr_positive, reorthonormalize, tall_matmul
from .regularizer import spectral_regularizer
from .svd import (
    fix_signs,
    gram64,
    gram_suffices,
    left_singular,
    principal_subspace,
    rank_spectrum,
    singular_values,
    svd,
    svdvals,
    top_left_singular,
    top_singular,
    truncation_rank,
    uses_randomized_svd,
)
from .tucker import hosvd_channel_factors, mode_product, unfold

__all__ = [
    "augment_basis",
    "condition_number",
    "fix_signs",
    "gram64",
    "gram_suffices",
    "hosvd_channel_factors",
    "left_singular",
    "mode_product",
    "orthonormal_columns",
    "orthonormal_complement",
    "principal_subspace",
    "qr_positive",
    "rank_spectrum",
    "regularizing_noise",
    "reorthonormalize",
    "singular_values",
    "spectral_regularizer",
    "svd",
    "svdvals",
    "tall_matmul",
    "top_left_singular",
    "top_singular",
    "truncation_rank",
    "unfold",
    "uses_randomized_svd",
]
