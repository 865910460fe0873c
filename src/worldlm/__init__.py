"""worldlm: federated training of language models across federations of federations.

The public API (docs/api.md) is importable from here; its names load their modules on first
use, so that `import worldlm` stays cheap for the command line and for plugins.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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
from worldlm.version import __version__

# Public name -> the module that defines it.
_EXPORTS = {
    # Configs and runs.
    "RunConfig": "worldlm.config",
    "TrainConfig": "worldlm.config",
    "ServerOptimizerConfig": "worldlm.config",
    "load_config": "worldlm.api",
    "config_from_dict": "worldlm.api",
    "default_config": "worldlm.api",
    "run": "worldlm.api",
    "resume": "worldlm.api",
    "compare": "worldlm.api",
    "RunResult": "worldlm.outputs",
    "MethodResult": "worldlm.comparison",
    "RunObserver": "worldlm.session",
    "QuietProgress": "worldlm.progress",
    "PlainProgress": "worldlm.progress_lines",
    "RichProgress": "worldlm.progress",
    # Aggregation rules (a node's `strategy`).
    "register_strategy": "worldlm.strategies.registry",
    "Strategy": "worldlm.strategies.registry",
    "RoundAggregation": "worldlm.strategies.registry",
    "StrategySettings": "worldlm.strategies.registry",
    "Update": "worldlm.core.messages",
    "State": "worldlm.core.messages",
    # Server optimizers (a node's `server_optimizer.name`).
    "register_server_optimizer": "worldlm.strategies.server_optimizer",
    # Leaf data read by a function (`nodes."<leaf>".data.source`).
    "register_data_source": "worldlm.data.custom_sources",
    # Random-init model builders (`model.preset`).
    "register_model_builder": "worldlm.model.build",
    # Local training (`train.trainer`).
    "register_local_trainer": "worldlm.train.trainer",
    "LocalTrainer": "worldlm.train.trainer",
    "StandardTrainer": "worldlm.train.trainer",
    "LocalJob": "worldlm.train.trainer",
    "LocalResult": "worldlm.train.trainer",
}

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ loads them
    from worldlm.api import compare, config_from_dict, default_config, load_config, resume, run
    from worldlm.comparison import MethodResult
    from worldlm.config import RunConfig, ServerOptimizerConfig, TrainConfig
    from worldlm.core.messages import State, Update
    from worldlm.data.custom_sources import register_data_source
    from worldlm.model.build import register_model_builder
    from worldlm.outputs import RunResult
    from worldlm.progress import QuietProgress, RichProgress
    from worldlm.progress_lines import PlainProgress
    from worldlm.session import RunObserver
    from worldlm.strategies.registry import (
        RoundAggregation,
        Strategy,
        StrategySettings,
        register_strategy,
    )
    from worldlm.strategies.server_optimizer import register_server_optimizer
    from worldlm.train.trainer import (
        LocalJob,
        LocalResult,
        LocalTrainer,
        StandardTrainer,
        register_local_trainer,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'worldlm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


# Every name above; tests check that it matches _EXPORTS and the errors.
__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "LocalJob",
    "LocalResult",
    "LocalTrainer",
    "MethodResult",
    "ModelError",
    "PlainProgress",
    "QuietProgress",
    "RichProgress",
    "RoundAggregation",
    "RunConfig",
    "RunObserver",
    "RunResult",
    "ServerOptimizerConfig",
    "StandardTrainer",
    "State",
    "Strategy",
    "StrategySettings",
    "TrainConfig",
    "TransportError",
    "Update",
    "UpdateRejected",
    "WireError",
    "WorldLMError",
    "__version__",
    "compare",
    "config_from_dict",
    "default_config",
    "load_config",
    "register_data_source",
    "register_local_trainer",
    "register_model_builder",
    "register_server_optimizer",
    "register_strategy",
    "resume",
    "run",
]
