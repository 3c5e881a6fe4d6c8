"""Request (``…Create``) and response (``…Public``) shapes, one module per resource.

Public shapes follow OpenAI's objects field for field, so the official client
parses them; internals such as file paths never appear in them.
"""
