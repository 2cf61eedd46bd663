"""pqsk's version, written into the header of every saved index."""

__version__ = "0.1.0.dev0"
