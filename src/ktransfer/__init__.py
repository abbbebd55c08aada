"""ktransfer: knowledge transfer for sequence generation (forward KD and backward KA distillation)."""

__version__ = "0.1.0"

from ktransfer.losses.divergences import KINDS, divergence  # noqa: E402
from ktransfer.losses.fused_linear import fused_linear_divergence  # noqa: E402
from ktransfer.losses.hf_loss import hf_loss, shift_labels  # noqa: E402
from ktransfer.losses.objectives import TransferLoss, transfer_loss  # noqa: E402

__all__ = ["KINDS", "TransferLoss", "__version__", "divergence", "fused_linear_divergence", "hf_loss", "shift_labels",
           "transfer_loss"]
