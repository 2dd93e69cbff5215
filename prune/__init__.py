"""prune stage (see the README)."""
