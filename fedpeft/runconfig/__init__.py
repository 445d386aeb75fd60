"""Run configuration: the flat run config of pyproject.toml parsed once into frozen
dataclasses, the one override parser, and named presets."""
