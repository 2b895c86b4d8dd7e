"""The nightly LoRA trainer: small stages with typed inputs and outputs, run by `appliance train`.

Importing this package is cheap; torch/transformers/peft are imported inside the stages that need them.
"""
