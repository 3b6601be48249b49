"""Named errors a user or the machine can cause, each with a message that says what to do.

Storage errors first; other modules add theirs below. Programmer errors are not here:
they are assertions and crash loudly.
"""

import errno as errno_codes


class InvalidConfigError(ValueError):
    """A configuration value is out of its allowed range."""


class LogError(Exception):
    """Anything a partition log refuses or fails to do."""


class StorageError(LogError, OSError):
    """An I/O error in a partition log (an OSError keeping the errno). The log rolled back
    what it could and stays usable, unless the error is a LogOfflineError."""


class DiskFullError(StorageError):
    """ENOSPC while appending: nothing of the batch stays on disk. Free space and retry."""

    def __init__(self, message: str) -> None:
        super().__init__(errno_codes.ENOSPC, message)


class LogOfflineError(StorageError):
    """An fdatasync failed: the kernel may have dropped the dirty pages, so what is on disk
    is unknown. The log refuses all further work; reopen it to recover from disk."""


class InvalidBatchError(LogError, ValueError):
    """A batch offered for append is not one valid RecordBatch v2; nothing was written."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class RecordBatchTooLargeError(InvalidBatchError):
    """A batch is larger than max_batch_bytes; split it on the producer."""


class OffsetOutOfRangeError(LogError):
    """A read asked for an offset outside [log_start_offset, log_end_offset]."""

    def __init__(self, offset: int, log_start_offset: int, log_end_offset: int) -> None:
        super().__init__(
            f"offset {offset} is outside [{log_start_offset}, {log_end_offset}]: "
            "fetch from log_start_offset or log_end_offset instead"
        )
        self.offset = offset
        self.log_start_offset = log_start_offset
        self.log_end_offset = log_end_offset


class CorruptDataError(LogError):
    """The requested offset lies in a corrupt region of a segment and is never served;
    restore the segment from a replica or skip to `next_good_offset`."""

    def __init__(self, file: str, position: int, offset: int, next_good_offset: int) -> None:
        super().__init__(
            f"offset {offset} is in a corrupt region of {file} starting at byte {position}: "
            f"restore the segment from a replica or fetch from offset {next_good_offset}"
        )
        self.file = file
        self.position = position
        self.offset = offset
        self.next_good_offset = next_good_offset
