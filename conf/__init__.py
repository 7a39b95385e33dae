"""Hydra configuration (YAML). A package only so that an installed copy is found as pkg://conf."""
