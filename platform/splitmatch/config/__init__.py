"""Typed experiment configuration: dataclasses loaded from YAML, validated, overridden, dumped.

One place parses configuration. Everything else receives the section it needs.
Errors are `ConfigError`s naming the offending key and the file it came from.

`sections` holds the dataclasses (and so every default), `loading` builds them from YAML and
`--set` overrides, `validation` checks them, `credentials` keeps secrets out of what is stored,
`history` reads stored configs by today's schema and `comparison` tells what differs.
"""
from splitmatch.config.comparison import (ABSENT, RESULT_NEUTRAL_KEYS, config_differences,
                                          describe_differences)
from splitmatch.config.credentials import (CREDENTIAL_VARIABLES, redact, redact_text,
                                           take_credentials, tracking_credentials,
                                           use_credentials)
from splitmatch.config.history import (ADDED_KEYS, REMOVED_KEYS, RETIRED_KEYS, retire_keys,
                                       stored_config_data)
from splitmatch.config.loading import (SPACE_KINDS, apply_overrides, config_file,
                                       config_from_dict, dump_config, flatten, load_config,
                                       resolve_paths, to_dict, yaml_value)
from splitmatch.config.sections import (ClipConfig, Config, ConfigError, DataConfig, EvalConfig,
                                        InferenceConfig, LossConfig, MatchingConfig, MFEConfig,
                                        ModelConfig, OptimConfig, PseudoMaskConfig,
                                        StorageConfig, ToyClipConfig, ToyWorldConfig,
                                        TrackingConfig, TrainConfig, TuneConfig)
from splitmatch.config.validation import MIN_IMAGE_SIDE, RUN_NAME, validate

__all__ = [
    "Config", "ConfigError", "ModelConfig", "MFEConfig", "DataConfig", "ToyWorldConfig",
    "ClipConfig", "ToyClipConfig", "PseudoMaskConfig", "MatchingConfig", "LossConfig",
    "OptimConfig", "TrainConfig", "InferenceConfig", "EvalConfig", "TrackingConfig",
    "StorageConfig", "TuneConfig", "load_config", "config_file", "config_from_dict",
    "apply_overrides", "dump_config", "to_dict", "flatten", "validate", "resolve_paths",
    "yaml_value", "SPACE_KINDS", "MIN_IMAGE_SIDE", "RUN_NAME", "RESULT_NEUTRAL_KEYS",
    "config_differences", "describe_differences", "ABSENT", "ADDED_KEYS", "REMOVED_KEYS",
    "RETIRED_KEYS", "retire_keys", "stored_config_data", "CREDENTIAL_VARIABLES", "redact",
    "redact_text", "take_credentials", "tracking_credentials", "use_credentials",
]
