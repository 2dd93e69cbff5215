"""What every stage shares: config, data, models, evaluation, checkpoints, tracking, engine.

core imports no stage (enforced by the import-linter contracts in pyproject.toml).
"""
