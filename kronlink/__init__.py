"""kronlink: medical entity linking that keeps learning new ontologies without
keeping old data, under a Kronecker-factored EWC penalty (KFC)."""

from kronlink.errors import (
    CheckpointError,
    ConfigError,
    DataFormatError,
    KronlinkError,
    UnsupportedModuleError,
)

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataFormatError",
    "KronlinkError",
    "UnsupportedModuleError",
    "__version__",
]
