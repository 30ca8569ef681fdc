"""The configs: defaults and presets (YAML) and the rules of their values (`configs.rules`)."""
