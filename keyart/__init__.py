"""keyart: personalized artwork selection."""
__version__ = "0.1.0"
