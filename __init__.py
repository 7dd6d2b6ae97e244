"""mailmeta: a mail-metadata pipeline with automatic expiry."""

__version__ = "0.1.0"
