"""Input data: sources of uint8 clips and their conversion to model input."""
