"""Feature stores: the user and item features of ids, looked up at serving time (torch-free).

- ``snapshot``: the unit of publishing - per-entity tables of raw values keyed by id;
- ``embedded``: snapshots in the registry directory (the default), aliased like model versions;
- ``encoded``: a snapshot encoded once per model schema, memory-mapped, and request assembly;
- ``redis_store``: snapshots in Redis (hashes + an active-snapshot key) for a fleet.

Publishing (reading KuaiRand-schema tables) is ``model.training.feature_tables`` + the CLI.
"""
