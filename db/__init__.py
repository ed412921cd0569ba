"""The Agent Lightning platform's persistence layer: settings, pooled engine, models, migrations."""
