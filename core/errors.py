"""Error tiers shared by the device side and the exporter.

Caller mistakes and bad files raise a subclass of :class:`InduceKVError`
(a ``ValueError``) whose message is one line naming what is wrong and how
to fix it. The CLIs turn these into exit code 2.
"""


class InduceKVError(ValueError):
    """A bad input: the message says what is wrong and how to fix it."""


class BundleError(InduceKVError):
    """A bundle directory is missing, corrupt, or does not match its manifest."""


class UnsupportedModelError(InduceKVError):
    """The source model's architecture is not in the export registry."""


class PromptError(InduceKVError):
    """A prompt is empty or does not fit the model's context."""


class BankError(InduceKVError):
    """A memory bank file is missing, corrupt, busy, or belongs to another model."""
