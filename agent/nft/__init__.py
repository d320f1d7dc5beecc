"""nftables subsystem: rules (pure rule set, script and digest), applier (``nft`` and the
forwarding sysctl)."""
