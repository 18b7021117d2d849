"""The one version string of odtk (setup.py reads it from here)."""
__version__ = "0.1.0"
