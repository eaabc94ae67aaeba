"""Shared by every Camelot process: settings, logging, errors, dtypes and server lifecycle.

Holds no domain logic; components import this and `protos`, never each other.
"""
