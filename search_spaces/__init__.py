"""Experiment search spaces shipped with msx (YAML); `msx launch --space NAME` finds them here."""
