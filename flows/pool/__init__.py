"""Points over many machines: the grid's chains as flow runs on a Prefect work pool.

With ``grid.work_pool: <pool>`` in params.yaml (or ``python -m flows.grid run --work-pool
<pool>``), the grid flow trains nothing in its own process: it submits each *chain* of the plan
(the points of a group, which share one constant-lr trunk, in ascending tokens) as a flow run
of the deployment ``train-chain/<pool>``, and the workers polling the pool, on any machine, run
them.

**Why a chain, not a point, is the unit of work.** A group's cooldowns branch from its trunk's
checkpoints (hundreds of MB for a real model, written every few hundred steps). Keeping a group
on one worker keeps them on that worker's disk, with no shared storage to set up or to wait on;
the groups, which are the many, spread over the workers. A chain that is submitted again after
its worker died resumes its unfinished point from the checkpoints when it lands on the same
machine (or a shared disk), and retrains it from the start elsewhere: either way the result is
the same (a point's numbers depend only on its id: flows/plan.py).

- flows/pool/worker.py: the flow a worker runs (``train-chain``);
- flows/pool/submit.py: the grid's side (submit, watch, resubmit crashed chains, cancel);
- flows/pool/deploy.py: the pool, its deployment, the zombie automation and the workers;
- ``python -m flows.pool {deploy,worker,up}`` (flows/pool/__main__.py); ``make pool
  WORKERS=N`` runs ``up`` on this machine.

Every machine needs the same code and data (a checkout at the same commit, ``dvc pull``): a
worker whose code or data give other point ids refuses the chain (its flow run fails, naming
the points).
"""

FLOW = "train-chain"


def deployment_name(pool: str) -> str:
    return f"{FLOW}/{pool}"
