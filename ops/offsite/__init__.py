"""Off-host copies to S3-compatible storage: Barman Cloud for WAL and base backups, boto3 for
the logical dumps."""
