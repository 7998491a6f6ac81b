"""fishertune: Fisher information as a practical, fast instrument for PyTorch models.

Subpackages: ``fisher`` (the Fisher engine), ``tune`` (Fisher-guided fine-tuning), ``layers``
(layer importance and compression) and ``recsys`` (the recommender lab, a user of the core).
"""

__version__ = "0.1.0"
