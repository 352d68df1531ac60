"""Data: image folders, tar shards, decoders, the built-in datasets, samplers and the one loader builder."""
