"""One exception type for every user-facing failure.

The CLI catches `AcornError` and prints its message as a single line on stderr with a
non-zero exit status, so a bad file, config or checkpoint never ends in a bare traceback.
Raise it at the boundary (config, file, request) with the reason *and* the fix.
"""


class AcornError(Exception):
    """A problem the user can fix: bad input, impossible config, missing or corrupt file."""


class ConfigError(AcornError):
    """A configuration that cannot work, detected before any training starts."""


class DataError(AcornError):
    """A corpus, dataset or prepared-data problem; the message names the file (and line)."""


class CheckpointError(AcornError):
    """A missing, corrupt or incompatible checkpoint; the message names the file."""


class GenerationError(AcornError):
    """Generation could not go on, e.g. the sampler's logits turned into nan/inf for a sequence."""


class DiskFullError(CheckpointError):
    """The disk filled up while a checkpoint (or prepared data) was written; the message names what was kept.

    Its own type (not just a CheckpointError) so callers and tests can tell "free space and
    resume" apart from a corrupt or incompatible checkpoint.
    """
