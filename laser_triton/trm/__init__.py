"""Tiny Recursive Model (TRM) with LASER inside."""
