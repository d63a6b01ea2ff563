"""embedder: transfer learning for image collections."""

__version__ = "0.1.0"
