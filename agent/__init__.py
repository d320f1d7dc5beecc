"""The node agent: receive snapshots → plan against the kernel → apply → ack.

It only ever touches devices whose names start with ``ot``, FDB entries on its own ``otvx*``
devices, and its own nftables table.
"""
