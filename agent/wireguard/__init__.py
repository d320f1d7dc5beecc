"""WireGuard subsystem (``otwg0``): keys (identity file, X25519), plan (pure diff and wire
formats), backends (kernel genl, wireguard-go UAPI), applier (contract and supervision)."""
