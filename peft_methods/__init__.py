"""Adapter methods: LoRA (and FFA-LoRA) through ``peft``, DP-safe soft prompts, (IA)3, BitFit,
bottleneck adapters (serial and parallel), prefix tuning.

Each method builds an :class:`~fedpeft.peft_methods.base.AdaptedModel` from a base model and settings;
the registry maps names to methods. Only the adapter's trainable tensors ever travel.
"""

from fedpeft.peft_methods.base import AdaptedModel
from fedpeft.peft_methods.bitfit import BitFitSettings
from fedpeft.peft_methods.bottleneck import BottleneckSettings
from fedpeft.peft_methods.ia3 import IA3Settings
from fedpeft.peft_methods.lora import LoraSettings
from fedpeft.peft_methods.prefix import PrefixSettings
from fedpeft.peft_methods.prompt import PromptSettings
from fedpeft.peft_methods.registry import METHODS, AdapterConfig, build, get_adapted

__all__ = ["METHODS", "AdaptedModel", "AdapterConfig", "BitFitSettings", "BottleneckSettings",
           "IA3Settings", "LoraSettings", "PrefixSettings", "PromptSettings", "build", "get_adapted"]
