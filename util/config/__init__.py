"""Configuration: each flag declared once, the typed configs derived from it, the name registries."""
