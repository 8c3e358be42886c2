"""Several engine replicas behind the same OpenAI routes, on Ray Serve (`ostinato serve
--replicas N`, docs/replicas.md). Ray is an optional extra (`pip install 'ostinato[ray]'`):
only ray_app.py imports it, and nothing on the single-process path imports ray_app.

    routing.py   the routing key (a prompt's first blocks) and the prefix-affinity policy
    asgi.py      one HTTP request run through a replica's own FastAPI app, in process
    metrics.py   /metrics of every replica, labelled by replica, and their aggregate
    ray_app.py   the Serve deployments (ingress, engine replicas) and their request router
"""
