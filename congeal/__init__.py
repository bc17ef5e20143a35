"""The ``congeal`` command: ``align`` and ``apply`` (the core), ``serve`` and ``demo`` (the service)."""
