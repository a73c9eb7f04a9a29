"""Errors the engine raises for bad input. Each names the problem and what to do."""


class NeuralAtlasError(Exception):
    """Base class: a problem the user can fix (bad input, bad settings)."""


class ClipError(NeuralAtlasError):
    """The clip (frames, video, masks, frame range) cannot be used."""


class ConfigError(NeuralAtlasError):
    """A configuration value or file is invalid."""


class OutputError(NeuralAtlasError):
    """The output folder cannot be written."""


class CheckpointError(NeuralAtlasError):
    """A checkpoint is missing, corrupt or does not match the configuration."""


class Cancelled(Exception):
    """Raised inside the engine when its cancellation token is set."""
