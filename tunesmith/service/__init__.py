"""The OpenAI-compatible fine-tuning service: API (FastAPI), store (SQLAlchemy), workers.

Modules: ``settings`` (one Settings object), ``db`` (tables, migrations), ``projects``
(keys), ``files``/``uploads``, ``jobs``, ``catalog`` (model names), ``inference``,
``worker``/``worker_child`` (the job queue), ``routes`` (thin HTTP layer), ``app``,
``server`` (``tunesmith serve``).
"""
