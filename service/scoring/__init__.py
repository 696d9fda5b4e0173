"""The scoring room: a request parsed and encoded (``request``), the features looked up by id
(``features``) and a model version's session (``scorer``) - what both ranking and rollout use."""
