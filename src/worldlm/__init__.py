"""worldlm: federated training of language models across federations of federations."""

from worldlm.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    ModelError,
    TransportError,
    UpdateRejected,
    WireError,
    WorldLMError,
)

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "ModelError",
    "TransportError",
    "UpdateRejected",
    "WireError",
    "WorldLMError",
    "__version__",
]
