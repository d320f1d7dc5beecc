"""The lab: a whole Otherix cluster on one machine, built from network namespaces.

Plumbing modules: ``netns`` (commands, namespaces, lab processes), ``topology`` (underlay
fabric, nodes, the outside host, cleanup), ``relay`` (node-namespace loopback -> root
loopback TCP relay), ``wire`` (tap <-> VM veth frame copier, the lab's hypervisor) and ``vm``
(VM namespaces). Nothing is imported here, so ``python -m lab.wire`` starts fast.
"""
