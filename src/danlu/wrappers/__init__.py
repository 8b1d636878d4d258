"""Optimizers that own an inner optimizer: EG step sizes, gradient penalty."""
