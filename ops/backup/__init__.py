"""Backups that are proven: scheduled ``pg_dump`` runs, manifests, retention, drills, restore."""
