"""Derivative-free optimization: zeroth-order (ES ≡ policy gradient) and MLE-guided sampling search."""
