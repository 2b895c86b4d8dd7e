"""The Textual console: install, watch and steer the appliance from one terminal.

Importing this package is cheap and never pulls in torch, transformers or peft; Textual itself is
imported only by `app.py` and the screens.
"""
