"""EMAE: Efficient Masked Autoencoders with Self-Consistency (MAE is the K=1, lambda=0 case)."""

__version__ = "0.1.0"
