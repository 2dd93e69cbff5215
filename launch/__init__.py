"""launch stage (see the README)."""
