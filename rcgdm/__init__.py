"""rcgdm: a replication of Reward-Directed Conditional Diffusion (Yuan et al., NeurIPS 2023)."""

__version__ = "0.1.0"
