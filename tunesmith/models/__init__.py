"""Base models: the registry, conversion into the cache, loading, templates."""
