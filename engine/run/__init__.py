"""A run's life outside the model: its config schemas, checks, run directory protocol, launch and queue. Imports no torch."""
