"""uda.losses."""
