"""Point-in-time recovery: Barman driven from the sidecar, in streaming mode."""
