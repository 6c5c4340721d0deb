"""rcgdm: a replication of Reward-Directed Conditional Diffusion (Yuan et al., NeurIPS 2023)."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """`from rcgdm import steer`: the context manager of rcgdm/steering.py, imported when asked for (torch and diffusers
    load with it)."""
    if name == "steer":
        from rcgdm.steering import steer

        return steer
    raise AttributeError(f"module 'rcgdm' has no attribute {name!r}")
