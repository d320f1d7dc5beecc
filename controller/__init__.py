"""The control plane: store → compute → versions → publish, plus the API and agents' reports.

``service`` composes ``api`` (handlers, validated by the pure ``ops``/``ipam``), ``publisher``
(heartbeat; stamps with the pure ``versions``), ``acks`` and ``tracker`` (what agents report) around
``store`` (the KV bucket). It owns intent, allocation and versions, and depends on ``schemas``
only. It never talks to a kernel: agents do that.
"""
