"""Links subsystem: model (plain data), plan (pure), netlink (kernel side), applier (contract),
fdb_socket (bulk VXLAN FDB over a raw rtnetlink socket)."""
