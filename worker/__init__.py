"""GPU workers: Celery app and tasks, pipelines, model adapters, imaging, outputs (SR, alerts), CLI."""

__all__: list[str] = []
