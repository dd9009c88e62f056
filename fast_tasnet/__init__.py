"""The fast Conv-TasNet: asteroid's `ConvTasNet` with a faster forward and backward pass on CPU
(`tasnet.py`), the fused C kernels it calls (`csrc/tcn_kernels.c`, built and loaded by
`tcn_native.py`).

The recipe uses this package only for `model.implementation: fast` (model.py); everything
else in the recipe runs on asteroid's own `ConvTasNet`.
"""
from .tasnet import (DEPTHWISE_FORMS, IMPLEMENTATIONS, NORM_EPS, FastConvTasNet,
                     fold_norm_into_linear, masker_supported, release_workspace)

__all__ = ["DEPTHWISE_FORMS", "IMPLEMENTATIONS", "NORM_EPS", "FastConvTasNet",
           "fold_norm_into_linear", "masker_supported", "release_workspace"]
