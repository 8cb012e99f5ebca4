"""Path-keyed storage drivers holding the registry:2 layout (local disk, S3)."""

from regmirror.storage.driver import Driver, PathNotFound, StorageUnavailable, TooLarge

__all__ = ["Driver", "PathNotFound", "StorageUnavailable", "TooLarge"]
