"""Dataset layouts, loaders and the synthetic sample generators (framework-free)."""

from .paths import dataset_root

__all__ = ["dataset_root"]
