"""quant stage (see the README)."""
