"""The dbops sidecar and the ``ops`` command."""
