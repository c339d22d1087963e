"""Serving a checkpoint: the inference worker process, generation, the OpenAI-compatible API and the chat CLI."""
