"""The console's data sources: small clients over the same code the CLI verbs use.

Each source is plain Python with no Textual import, so it can be called from worker threads and
tested on its own. `context.Sources` bundles them; tests swap in recorded data (`recorded.py`).
"""
