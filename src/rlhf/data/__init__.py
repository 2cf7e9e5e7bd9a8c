"""Dataset reading, normalisation and processing."""
