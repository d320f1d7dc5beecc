"""The control plane: store → compute → publish, plus the API.

It owns intent and allocation. It never talks to a kernel: agents do that.
"""
