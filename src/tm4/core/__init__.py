"""The whitelist's state, pure: model, services, config, durations, errors, the SQLite store and the rule rendering.

Imports nothing else of tm4: every other package builds on this one.
"""
