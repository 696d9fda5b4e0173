"""The ranking room: one /rank request read top to bottom, without HTTP (``ranking.Ranker``).
It reads the served state the rollout room keeps; its admission (bounded queue, deadlines) is
ASGI-level and lives in the HTTP room."""
