"""Fine-tuning jobs and their training files: the records, the rules a job's life follows, and the
stores that keep them (a directory for the embedded default, Redis for a fleet).

The API (`server.api.fine_tuning`) writes files and jobs and publishes what a worker trained; the
worker (`training.worker`) claims jobs, reports progress and writes checkpoints. Both meet only here.
"""
