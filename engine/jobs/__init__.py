"""Jobs that use a trained model: evaluation, export (merge, GGUF, Hub push), default-model preparation."""
