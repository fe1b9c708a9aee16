"""Sparse-autoencoder feature extraction for language models.

Stages (each `python -m pipeline <stage> key=value ...`): harvest, train. See README.md.
"""

__version__ = "0.1.0"
