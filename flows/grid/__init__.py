"""The grid: every point of params ``grid`` trained once and recorded.

flows/grid/flow.py is the Prefect flow (one skeleton, wherever the points run), flows/grid/
local.py the runner that trains them on this machine (the work pool's is flows/pool/submit.py),
and ``python -m flows.grid`` the command line (flows/grid/__main__.py).
"""
