"""uda.models."""
