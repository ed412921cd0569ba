"""Server-side collectors of the sidecar: a module per family, run by the exporter."""
