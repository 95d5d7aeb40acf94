"""Dataset import: presets for the datasets of the field and `undo data import` (see importer.py)."""
