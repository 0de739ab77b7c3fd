"""Exceptions shared by the library and the command line (no heavy imports here)."""


class UserError(Exception):
    """A failure caused by the caller's input or setup: shown as one clear line, never a traceback."""


class BundleError(UserError):
    """A model bundle that is missing, inconsistent, tampered with or does not fit its architecture."""


class VideoError(UserError):
    """A video that cannot be opened, decoded or is outside the configured limits."""
