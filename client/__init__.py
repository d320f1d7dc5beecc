"""Operator-side package: the typed API client (``client.api``) and the ``otherixctl`` CLI
(``client.cli``). Depends on ``schemas`` only; the agent and the lab use it to talk to the
controller, which never imports it."""
