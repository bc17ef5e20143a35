"""Celery worker (``worker.app``) and the training child (``worker.run_job``).

Only the child imports ``models`` (and so torch); see ``worker/app.py``.
"""
