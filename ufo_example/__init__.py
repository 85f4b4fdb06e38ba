"""The UFO multi-task example: digits images, four tasks, elastic training (see README.md)."""
