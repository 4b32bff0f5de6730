"""Test-time augmentation: transforms, merges, uncertainty, the Lightning callback and the plain-module wrapper."""
