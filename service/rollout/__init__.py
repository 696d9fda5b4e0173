"""The rollout room: the reconciler (desired aliases -> one ServingState), the feature source,
the canary monitor, shadow scoring, drift windows, the /models catalog and the background loop
and back-off they share."""
