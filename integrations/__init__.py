"""Framework adapters: one module per framework, each behind its own extra.

Each adapter imports only its framework and the core, and fails with a one-line install hint when
its extra is missing (``pip install "clearance[langgraph]"``). The core never imports these.
"""
