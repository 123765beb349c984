"""kontext-queue: the core and the Celery side of the WaveSpeed edit queue."""
