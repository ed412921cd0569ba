"""What a fresh platform starts with: default agents, the first admin, samples, the knowledge base.

:func:`db.seed.run.seed` upserts it all in one transaction; :func:`db.seed.init.initialize` is
``ops db init`` (wait, lock, upgrade, roles, seed).
"""
