"""Training inside a rank: the entry point (``python -m engine.train``), stage builders, model set-up, callbacks,
padding-free attention and collation, vocabulary extension."""
