"""queryshift: online test-time adaptation of cross-modal retrieval models under query shift."""

__version__ = "0.1.0"
