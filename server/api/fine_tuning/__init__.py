"""OpenAI-shaped fine-tuning on a serving replica: training files, jobs and their events, the
validation of a job's files, and the storing of what a worker trained as a task's new version.

The routes are `server.api.routes.files` and `server.api.routes.fine_tuning`; the records and their
stores are `prefix_store.jobs`; training happens in `training.worker`, never in this process.
"""
