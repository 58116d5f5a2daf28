"""Command-line entry points (console scripts uda-*); each parses its arguments before importing torch."""
