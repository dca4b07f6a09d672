"""The OpenAI-compatible HTTP API (`hivegen api serve`)."""
