"""Adapter methods: LoRA (and FFA-LoRA) through ``peft``, and DP-safe soft prompts.

Each method builds an :class:`~peft_methods.base.AdaptedModel` from a base model and settings;
the registry maps names to methods. Only the adapter's trainable tensors ever travel.
"""

from peft_methods.base import AdaptedModel
from peft_methods.lora import LoraSettings
from peft_methods.prompt import PromptSettings
from peft_methods.registry import METHODS, AdapterConfig, build, get_adapted

__all__ = ["METHODS", "AdaptedModel", "AdapterConfig", "LoraSettings", "PromptSettings",
           "build", "get_adapted"]
