"""The HTTP service (FastAPI). Never imports torch; ``service.contracts`` is shared with ``worker``.

Kept empty on purpose: the worker imports ``service.contracts``, and that must
not pull in FastAPI.
"""
