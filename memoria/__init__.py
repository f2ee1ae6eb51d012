"""Memoria: Hebbian memory for transformers (Park & Bak, ICML 2024). Imports torch only (and, for the
GPU graph-walk kernel in kernels.py, Triton, which torch's CUDA builds ship).

    from memoria import Memoria, EngramType, Engrams, Abstractor
"""

from .abstractor import Abstractor
from .engrams import Engrams, EngramType
from .history import EngramHistory, edge_weights
from .memoria import Memoria

__version__ = "0.1.0"
__all__ = ["Abstractor", "Engrams", "EngramType", "EngramHistory", "Memoria", "edge_weights"]
