"""Converters between published checkpoints and mimkit's own layouts."""
