"""vidrank online serving: FastAPI app, scorer, fusion, reconciler."""
