"""danlu's optimizers, one algorithm per file."""
