"""faceedit: networks, checkpoint loaders and edit algebra shared by exporters and services."""

__version__ = "0.1.0"
