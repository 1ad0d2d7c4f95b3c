"""gpufaas: serverless ML inference on GPUs (the ``gpufaas`` command lives here)."""

__version__ = "0.1.0"
