"""The Celery worker that runs update jobs (DESIGN.md sections 1 and 7).

- ``worker.app``: the Celery app factory and the process's job context.
- ``worker.tasks``: thin tasks that call plain functions.
- ``worker.job``: the update job's body, ``run_job(context, job_id)``.
- ``worker.sweep``: deletes stale staged data and recovers lost jobs.

It imports ``kronlink`` and never ``service``; ``kronlink`` never imports it.
docs/worker.md describes settings, phases and guarantees.
"""
