"""Sparse-autoencoder feature extraction for language models.

Stages (each `python -m pipeline <stage> key=value ...`, code in pipeline/stages/): harvest, train,
evaluate, analyze, compare, finetune, and `all` (harvest -> train -> evaluate -> analyze). The
modules beside stages/ are the parts they are built from; parts never import a stage. See README.md.
"""

__version__ = "0.1.0"
