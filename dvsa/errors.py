"""User-facing errors: the ``dvsa`` command prints these as one line, without a traceback."""


class DvsaError(Exception):
    """A problem the user can fix (bad input file, missing Java, bad checkpoint path...)."""


class DataError(DvsaError):
    """Input data that cannot be read: names the file and, where known, the position."""
