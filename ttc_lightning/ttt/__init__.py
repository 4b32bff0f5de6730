"""Test-time training (adaptation): parameter selection, normalisation statistics, objectives, the callback, presets."""
