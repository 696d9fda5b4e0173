"""vidrank online serving: FastAPI app, scorer, fusion, model manager."""
