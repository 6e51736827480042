"""simfl plugins that fail to load (for simfl's tests)."""
