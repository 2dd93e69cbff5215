"""distill stage (see the README)."""
