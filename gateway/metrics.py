"""Placeholder while issue 9 is built."""
