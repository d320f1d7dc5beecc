"""Links subsystem: model (plain data), plan (pure), netlink (kernel side), applier (contract),
fdb_socket (bulk FDB writes over a raw rtnetlink socket), fdb_dump (its dump, parsed into
the observed FDB tables)."""
