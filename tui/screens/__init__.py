"""Modal screens: help, settings, race results."""
