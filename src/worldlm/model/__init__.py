"""Causal language models: size presets built with Hugging Face transformers, or local HF dirs."""
