"""mgllava."""
