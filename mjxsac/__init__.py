"""mjxsac: Soft Actor-Critic fused with MuJoCo-MJX environments in one ``lax.scan``."""

__version__ = "0.1.0"
