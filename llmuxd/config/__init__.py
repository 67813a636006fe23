"""Configuration: the schema, the loader, and errors a person can act on.

The package is split by concern:

- ``schema``  what each key means and its default (pydantic, v1 API on 1.10 and 2.x)
- ``values``  single values as users write them (durations, sizes, addresses) and
              the strict field types built on them
- ``loader``  YAML main file + ``models.d`` drop-ins, raw data to a checked Config
- ``legacy``  llmux 0.7 configurations translated into this schema
- ``checks``  rules that span keys, and backend port allocation
- ``issues``  ``ConfigError``: one ``FILE: KEY.PATH: what; fix`` line per problem

Import the public names from here; all durations are float seconds.
"""

from llmuxd.config.issues import ConfigError, ConfigIssue
from llmuxd.config.loader import load_config
from llmuxd.config.schema import (
    DEFAULT_CONFIG_PATH,
    DEFAULT_GROUP,
    DEFAULT_LISTEN,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_PORT_RANGE,
    DEFAULT_STATE_DIR,
    DROPIN_DIRNAME,
    GPU_PROBES,
    POLICY_TYPES,
    CheckpointConfig,
    Config,
    GroupConfig,
    ModelConfig,
    ObjectStoreConfig,
    PolicyConfig,
)
from llmuxd.config.values import (
    DURATION_HELP,
    SIZE_HELP,
    parse_duration,
    parse_listen,
    parse_size,
    tensor_parallel_size_from_args,
)

__all__ = [
    "CheckpointConfig", "Config", "ConfigError", "ConfigIssue", "GroupConfig", "ModelConfig", "ObjectStoreConfig",
    "PolicyConfig", "load_config", "parse_duration", "parse_listen", "parse_size",
    "tensor_parallel_size_from_args", "DEFAULT_CONFIG_PATH", "DEFAULT_GROUP", "DEFAULT_LISTEN",
    "DEFAULT_MAX_BODY_BYTES", "DEFAULT_PORT_RANGE", "DEFAULT_STATE_DIR", "DROPIN_DIRNAME",
    "GPU_PROBES", "POLICY_TYPES", "DURATION_HELP", "SIZE_HELP",
]
