"""The error tiers; they live in ``inducekv.core.errors`` (kept here for existing imports)."""
from inducekv.core.errors import BankError, BundleError, InduceKVError, PromptError, UnsupportedModelError

__all__ = ["InduceKVError", "BundleError", "UnsupportedModelError", "PromptError", "BankError"]
