"""uda.data."""
