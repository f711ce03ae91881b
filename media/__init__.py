"""Media: audio and video I/O, encoding, avatars, face geometry and renderers."""
