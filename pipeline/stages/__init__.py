"""The stages, one module each: a config dataclass (the `<stage>:` node of the Hydra config), the
stage's logic in plain functions that tests call directly, and a thin `@hydra.main` at the bottom.

Stages are built from the parts in pipeline/ (models, hooks, corpus, shards, sae/, training,
evaluation, feature_stats, attribution, dashboard/, rundir, ...). A stage never imports another
stage (`all` aside, which runs them in order), and no part imports a stage: machinery two stages
share lives in a part.
"""
