"""The model error, apart from the modules that import torch: the command line and storage name it cheaply."""


class ModelError(RuntimeError):
    """A model that cannot be resolved, fetched or loaded; the message says what to do."""
