"""dldr: train neural networks in a tiny subspace of their parameters (DLDR + P-BFGS)."""

from dldr.errors import DldrError

__version__ = "0.1.0"
__all__ = ["DldrError", "__version__"]
