"""Model definitions (image encoders, checkpoint handling)."""
