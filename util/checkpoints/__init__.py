"""Checkpoints and files: the one reader, safe deserialization, names and hubs, layouts and
conversion, position-embedding resizing, the one atomic writer, and find-resume."""
